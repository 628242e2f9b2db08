"""`medmnist`: MedMNIST v2 / MedMNIST+ from the official .npz release files.

Keeps the official splits (train / val -> validation / test) and labels.
Single-label datasets get one categorical condition `label`; multi-label ones
(ChestMNIST: [N, 14] binary) get one binary condition `label_<k>` per column.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from medgen_jax.data import builders
from medgen_jax.data.info import CATEGORICAL, ConditionField, DatasetInfo
from medgen_jax.data.intensity import transform_for

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Nothing is downloaded at run time. Download the official MedMNIST .npz files
(https://medmnist.com, Zenodo record 10519652), e.g. `pneumoniamnist.npz`
(28x28) or `pneumoniamnist_64.npz` (MedMNIST+, sizes 64/128/224; 3D sets
such as `organmnist3d_64.npz`) into one directory, then set
  --config.source_dir=THAT_DIR --config.medmnist_flag=pneumoniamnist
  --config.image_size=28 (or 64 / 128 / 224) [--config.mode=3d for *3d sets]
Each file holds train_images, train_labels, val_images, val_labels,
test_images, test_labels (uint8 images [N, H, W(, 3)] or [N, D, H, W]).
"""
_SPLIT_KEYS = {"train": "train", "validation": "val", "test": "test"}


def npz_path(data_config) -> str:
  flag = data_config.get("medmnist_flag") or ""
  size = data_config.image_size
  name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
  return os.path.join(os.path.expanduser(data_config.get("source_dir") or ""), name)


def validate(data_config) -> None:
  if not data_config.get("medmnist_flag"):
    raise ValueError("medmnist: set data.medmnist_flag, e.g. 'pneumoniamnist'")
  path = npz_path(data_config)
  if not os.path.isfile(path):
    raise ValueError(f"medmnist: {path} not found.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")


def config_name(data_config) -> str:
  st = os.stat(npz_path(data_config))
  fields = {"file": os.path.basename(npz_path(data_config)), "size": st.st_size,
            "mtime": st.st_mtime_ns, "mode": data_config.mode}
  return f"{data_config.medmnist_flag}_{data_config.image_size}_{builders.config_hash(fields)}"


def _load(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except Exception as e:
    raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
  need = [f"{s}_{k}" for s in _SPLIT_KEYS.values() for k in ("images", "labels")]
  missing = [k for k in need if k not in arrays]
  if missing:
    raise ValueError(f"{path}: missing arrays {missing}; expected the official "
                     f"MedMNIST keys {need}")
  return arrays


def plan(data_config) -> builders.Plan:
  validate(data_config)
  path = npz_path(data_config)
  arrays = _load(path)
  images = {s: arrays[f"{k}_images"] for s, k in _SPLIT_KEYS.items()}
  labels = {s: arrays[f"{k}_labels"].reshape(len(images[s]), -1).astype(np.int64)
            for s, k in _SPLIT_KEYS.items()}
  shapes = {img.shape[1:] for img in images.values()}
  if len(shapes) != 1:
    raise ValueError(f"{path}: splits have different image shapes {shapes}")
  shape = shapes.pop()
  spatial_rank = 3 if data_config.mode == "3d" else 2
  rgb = len(shape) == spatial_rank + 1 and shape[-1] == 3
  spatial = shape[:-1] if rgb else shape
  if len(spatial) != spatial_rank or any(s != data_config.image_size for s in spatial):
    raise ValueError(f"{path}: images are {shape}, expected "
                     f"{(data_config.image_size,) * spatial_rank} (+3 for RGB) for "
                     f"mode={data_config.mode!r}, image_size={data_config.image_size}")
  for s, img in images.items():
    if img.dtype != np.uint8:
      raise ValueError(f"{path}: {s} images are {img.dtype}, expected uint8")
  num_labels = labels["train"].shape[1]
  all_labels = np.concatenate(list(labels.values()))
  if all_labels.min() < 0:
    raise ValueError(f"{path}: negative labels")
  if num_labels == 1:
    num_classes = int(all_labels.max()) + 1
    fields = (ConditionField("label", CATEGORICAL, num_classes,
                             tuple(str(i) for i in range(num_classes))),)
  else:
    if all_labels.max() > 1:
      raise ValueError(f"{path}: multi-label labels must be 0/1")
    fields = tuple(ConditionField(f"label_{k}", CATEGORICAL, 2, ("0", "1"))
                   for k in range(num_labels))
  mods = ("r", "g", "b") if rgb else ("gray",)
  features = {m: tfds.features.Tensor(shape=spatial, dtype=np.uint8) for m in mods}
  for f in fields:
    features[f.name] = tfds.features.ClassLabel(num_classes=f.num_classes)

  def split_examples(split):
    def generate():
      for i in range(len(images[split])):
        img = images[split][i]
        ex = ({m: img[..., c] for c, m in enumerate(mods)} if rgb
              else {"gray": img})
        for k, f in enumerate(fields):
          ex[f.name] = int(labels[split][i, k])
        yield i, ex
    return generate

  info = DatasetInfo(
      name="medmnist", image_shape=tuple(spatial) + (len(mods),), modalities=mods,
      intensity=tuple(transform_for(m, "raw", raw_range=(0, 255)) for m in mods),
      conditions=fields, spacing_mm=(1.0,) * len(spatial),
      extra={"intensity_policy": {m: "raw" for m in mods}, "has_lesion_mask": False,
             "medmnist_flag": data_config.medmnist_flag})
  summary = {
      "name": "medmnist", "config_name": config_name(data_config),
      "examples": {s: int(len(images[s])) for s in images},
      "image_shape": list(info.image_shape), "modalities": list(mods),
      "intensity_policy": {m: "uint8 [0, 255] -> [-1, 1]" for m in mods},
      "conditions": [f.name for f in fields], "skipped": [], "skipped_counts": {}}
  return builders.Plan("medmnist", summary["config_name"],
                       tfds.features.FeaturesDict(features),
                       {s: split_examples(s) for s in images if len(images[s])},
                       info, summary)
