r"""T1 + FLAIR -> T2 translation on your own paired MRI folder (`medical_folder`).

  python -m experiments.train --config configs/mri_t1flair2t2.py \
      --config.data.source_dir=/data/mri --workdir runs/t1flair2t2
  python -m experiments.evaluate --config configs/mri_t1flair2t2.py \
      --config.data.source_dir=/data/mri --workdir runs/t1flair2t2

`source_dir` holds one folder per subject with `t1`, `flair` and `t2` volumes
on one grid (NIfTI, DICOM series or NPY; docs/data.md). Intensities are
percentile-normalised per volume (MRI has no physical unit), so PSNR / MAE are
in normalised units. Covariates come from `--config.data.labels_csv` when
given; without it the translator is conditioned on the sources alone.

The same cross-modal translator as configs/phantom_ct2pet.py, with two
sources: each has its own encoder and a learned modality embedding, and
`model.modality_dropout=0.3` masks a random source in training, so a subject
without FLAIR (or T1) is translated from the other one at inference (a
missing source is masked out of the attention, not zero-filled).

Variants (comma-separated): `quick` (16x16 slices, for tests), `unet` (the
pix2pix U-Net baseline), `attention=NAME`.
"""
import ml_collections

from configs import common, data_folder, phantom_ct2pet

SOURCES = ("t1", "flair")
TARGETS = ("t2",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, _ = common.parse_variants(
      arg, config="mri_t1flair2t2", flags=("quick", "unet"), values=("attention",))
  config = phantom_ct2pet.get_config(arg)
  config.data = data_folder.get_config("quick" if "quick" in variants else None)
  config.data.modalities = SOURCES + TARGETS
  config.data.intensity_policy = ("percentile",)
  m = config.model
  m.source_modalities = SOURCES
  m.target_modalities = TARGETS
  m.modality_dropout = 0.3
  m.token_grid = phantom_ct2pet.token_grid(config)  # of the new data section
  if "quick" in variants:
    config.train.batch_size = 4  # a test folder holds a few subjects only
  return config
