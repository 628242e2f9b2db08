"""medmnist reads the official .npz layout and keeps splits and labels."""
import numpy as np
import pytest

from configs import data_phantom
from medgen_jax import data


def _config(tmp_path, **overrides):
  c = data_phantom.get_config()
  c.name = "medmnist"
  c.source_dir = str(tmp_path)
  c.medmnist_flag = "pneumoniamnist"
  c.image_size = 28
  c.modalities = ()
  c.data_dir = str(tmp_path / "tfds")
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _write(tmp_path, name="pneumoniamnist.npz", counts=(10, 4, 6), shape=(28, 28),
           labels_per=1, classes=2):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in zip(("train", "val", "test"), counts):
    arrays[f"{split}_images"] = rng.integers(0, 256, (n,) + shape).astype(np.uint8)
    arrays[f"{split}_labels"] = rng.integers(0, classes, (n, labels_per)).astype(np.uint8)
  np.savez(tmp_path / name, **arrays)
  return arrays


def test_official_splits_labels_and_pixels(tmp_path):
  arrays = _write(tmp_path)
  c = _config(tmp_path)
  summary = data.build(c)
  assert summary["examples"] == {"train": 10, "validation": 4, "test": 6}
  info = data.load_info(c)
  assert info.image_shape == (28, 28, 1)
  assert info.condition("label").num_classes == 2
  for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
    out = data.load_arrays(c, split=split)
    # TFDS shuffles storage order: compare as multisets keyed by pixels.
    want = {arrays[f"{key}_images"][i].tobytes(): int(arrays[f"{key}_labels"][i, 0])
            for i in range(len(arrays[f"{key}_images"]))}
    pixels = np.round((out["image"][..., 0] + 1) / 2 * 255).astype(np.uint8)
    got = {pixels[i].tobytes(): int(out["label"][i]) for i in range(len(pixels))}
    assert got == want


def test_multilabel_rgb(tmp_path):
  _write(tmp_path, "chestmnist_64.npz", shape=(64, 64, 3), labels_per=14)
  c = _config(tmp_path, medmnist_flag="chestmnist", image_size=64)
  info = data.load_info(c)
  assert info.image_shape == (64, 64, 3) and info.modalities == ("r", "g", "b")
  assert [f.name for f in info.conditions] == [f"label_{k}" for k in range(14)]


def test_missing_file_and_bad_keys(tmp_path):
  with pytest.raises(ValueError, match="pneumoniamnist.npz not found"):
    data.build(_config(tmp_path))
  np.savez(tmp_path / "pneumoniamnist.npz", images=np.zeros((2, 28, 28), np.uint8))
  with pytest.raises(ValueError, match="missing arrays"):
    data.build(_config(tmp_path))
