r"""Data config: `medical_folder`, your own NIfTI / DICOM / PNG / NPY folder.

  python -m experiments.build_dataset --config configs/data_folder.py \
      --config.source_dir=/data/my_ct --config.data_dir=/tmp/tfds \
      [--config.mode=3d] [--config.modalities=t1,t2] \
      [--config.labels_csv=/data/labels.csv]

Variants: `:quick` (tiny sizes, for tests), `:mri` (t1,t2 percentile-normalised).
See docs/data.md for accepted layouts and the bad-input policy.

Fields beyond those of configs/data_phantom.py:
  source_dir: folder with one entry per subject (required).
  labels_csv: optional CSV, one row per subject: `subject_column` + covariates;
    numeric columns -> continuous conditions, others -> categorical.
  subject_column: name of the CSV column holding the subject (entry) name.
  categorical_columns: comma list of numeric columns to treat as categorical.
  class_names: {column: 'a,b,c'} fixing class order; other values are errors.
  intensity_policy: '' (ct -> ct_window, pet -> suv, else percentile) or one
    of ct_window|suv|percentile|raw, or a comma list, one per modality.
  percentiles: (lo, hi) foreground percentiles mapped to [0, 1] (MRI).
  raw_range: (lo, hi) for the 'raw' policy (8-bit PNG: (0, 255)).
  slice_step: 2D mode keeps every k-th axial slice.
  foreground_only, foreground_fraction: 2D mode drops slices whose fraction of
    voxels above 10% of the intensity window is below this.
  split_fractions: (train, validation, test), by subject (hash of opaque id).
  id_salt: salt of the subject-id hash; set a private one for real data.
"""
import ml_collections

from configs import common, data_phantom


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = data_phantom.get_config()
  config.name = "medical_folder"
  config.source_dir = ml_collections.config_dict.placeholder(str)
  config.labels_csv = ml_collections.config_dict.placeholder(str)
  config.subject_column = "subject"
  config.categorical_columns = ("",)
  config.class_names = ml_collections.ConfigDict()
  config.modalities = ("ct",)
  config.intensity_policy = ("",)
  config.percentiles = (1.0, 99.0)
  config.raw_range = (0.0, 255.0)
  config.slice_step = 1
  config.foreground_only = True
  config.foreground_fraction = 0.05
  config.split_fractions = (0.8, 0.1, 0.1)
  config.id_salt = "medgen_jax-default-salt"
  variants, _ = common.parse_variants(arg, config="data_folder", flags=("quick", "mri"))
  for variant in variants:
    if variant == "quick":
      config.image_size = 16
      config.depth = 8
    elif variant == "mri":
      config.modalities = ("t1", "t2")
  return config
