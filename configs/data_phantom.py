r"""Data config: the built-in `ct_phantom` chest CT (+ PET) dataset.

Build it (cached afterwards; training builds it on first use anyway):

  python -m experiments.build_dataset --config configs/data_phantom.py \
      --config.data_dir=/tmp/tfds

Variants: `configs/data_phantom.py:quick` (tiny, for tests), `:3d`
(32x64x64 volumes), `:pet` (paired CT + PET channels).

Training configs embed it as `config.data = data_phantom.get_config(arg)`.

Fields:
  name: builder name, 'ct_phantom' | 'medical_folder' | 'medmnist'.
  data_dir: where TFDS datasets live; None -> ~/.cache/medgen_jax/tensorflow_datasets.
  image_size: H = W in voxels (8-256); the phantom field of view is 350 mm.
  mode: '2d' axial slices or '3d' volumes.
  depth: D of 3D volumes.
  modalities: channels fed to the model, ('ct',) or ('ct', 'pet'); a comma
    string 'ct,pet' is accepted on the command line.
  num_subjects: subjects per split (train / validation / test), split by subject.
  slices_per_subject: 2D slices per subject (ignored in 3D: one volume each).
  ct_window: (lo, hi) HU mapped onto [-1, 1] (read-time: no rebuild).
  pet_max_suv: SUV mapped onto +1 (read-time: no rebuild).
  seed: phantom generation seed (changing it builds a new dataset).
  hide_labels: '' or rules like 'lesion:site=3' (';'-separated): the train
    split is read with that label unknown where the other field has that
    class (read-time, see medgen_jax/data/hidden_labels.py).
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "ct_phantom"
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.image_size = 64
  config.mode = "2d"
  config.depth = 32
  config.modalities = ("ct",)
  config.num_subjects = ml_collections.ConfigDict(
      {"train": 200, "validation": 20, "test": 20})
  config.slices_per_subject = 16
  config.ct_window = (-1000.0, 1000.0)
  config.pet_max_suv = 10.0
  config.seed = 0
  config.hide_labels = ""
  variants, _ = common.parse_variants(arg, config="data_phantom",
                                     flags=("quick", "3d", "pet"))
  for variant in variants:
    if variant == "quick":
      config.image_size = 32
      config.depth = 8
      config.num_subjects = ml_collections.ConfigDict(
          {"train": 6, "validation": 2, "test": 2})
      config.slices_per_subject = 4
    elif variant == "3d":
      config.mode = "3d"
    elif variant == "pet":
      config.modalities = ("ct", "pet")
  return config
