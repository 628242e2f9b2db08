r"""The conditional Transformer GAN on your own folder of scans (`medical_folder`).

  python -m experiments.train --config configs/folder_gan.py \
      --config.data.source_dir=/data/my_ct --workdir runs/my_ct
  python -m experiments.sample --config configs/folder_gan.py \
      --config.data.source_dir=/data/my_ct --workdir runs/my_ct --num_samples 16 \
      --out runs/my_ct/samples
  python -m experiments.evaluate --config configs/folder_gan.py \
      --config.data.source_dir=/data/my_ct --workdir runs/my_ct

`data.source_dir` is the only required setting: one NIfTI file, DICOM series
or PNG/NPY per subject (docs/data.md). Everything else is configs/phantom_gan.py
(model, train, optim, loss, eval, parallel; configs/phantom_3d.py for `3d`)
with the data section of configs/data_folder.py, the same image sizes.

Conditions come from `--config.data.labels_csv=labels.csv` (one row per
subject; numeric columns continuous, others categorical). Without a CSV the
model is unconditional and what needs conditions adapts by itself: the
condition teacher is off (`loss.teacher_weight` unset means on with
conditions, off without), sample grids have one row, the evaluation's
extractor learns a label-free pretext task and reports no condition fidelity.
Asking for what cannot work (`--config.loss.teacher_weight=1` or AC heads
without conditions, `teacher.fields` naming no CSV column) fails with
one message before the dataset is built.

Variants (comma-separated): `quick` (16x16 slices or 8x16x16 volumes, a few
steps; the tests use it), `3d` (volumes: configs/phantom_3d.py's 16x32x32
CPU size, axial attention, teacher off as there), `cnn` (the convolutional
generator baseline), `attention=NAME`. MRI or PET: set
`--config.data.modalities=t1` (percentile intensity policy) or `=pet` (SUV).
"""
import ml_collections

from configs import common, data_folder, phantom_3d, phantom_gan

DATA_FIELDS = ("mode", "image_size", "depth")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, values = common.parse_variants(
      arg, config="folder_gan", flags=("quick", "3d", "cnn"), values=("attention",))
  passed = ",".join([v for v in variants if v != "3d"] +
                    [f"{k}={v}" for k, v in values.items()])
  if "3d" in variants:
    config = phantom_3d.get_config(passed or None)
  else:
    config = phantom_gan.get_config(passed or None)
  # The base config's sizes fit its model's token grid: keep them.
  shape = {k: config.data[k] for k in DATA_FIELDS}
  config.data = data_folder.get_config("quick" if "quick" in variants else None)
  if "quick" in variants and "3d" not in variants:
    shape["image_size"] = config.data.image_size  # 16x16 slices: 2x2 patches, 8x8 tokens
  config.data.update(shape)
  if "3d" not in variants:
    # None: on when the dataset has conditions, off without (train.loop.teacher_weight).
    config.loss.teacher_weight = ml_collections.config_dict.placeholder(float)
    # Select with every condition of the labels CSV (the phantom's 'lesion'
    # need not be one); without conditions sampling is plain.
    config.selector.fields = ""
  return config
