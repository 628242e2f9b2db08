"""grain pipeline over ct_phantom: ranges, determinism, sharding, save/restore."""
import json

import numpy as np
import pytest

from configs import data_phantom
from medgen_jax import data
from medgen_jax.data import phantom


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = data_phantom.get_config("quick,pet")
  c.data_dir = str(tmp_path_factory.mktemp("tfds"))
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batches_and_info(config):
  it, info = data.load_dataset(config, split="train", batch_size=4, seed=0)
  batch = next(it)
  assert batch["image"].shape == (4, 32, 32, 2) and batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  assert batch["lesion"].dtype == np.int32 and batch["site"].dtype == np.int32
  assert batch["age"].dtype == np.float32 and batch["lesion_mask"].dtype == np.uint8
  assert batch["lesion_mask"].shape == (4, 32, 32)
  assert np.all((20 <= batch["age"]) & (batch["age"] <= 90))
  # The mask agrees with the class and the diameter.
  assert np.all((batch["lesion"] > 0) == (batch["lesion_mask"].sum((1, 2)) > 0))
  assert np.all((batch["lesion"] > 0) == (batch["lesion_diameter_mm"] > 0))
  assert info.modalities == ("ct", "pet")
  assert [f.name for f in info.conditions] == ["lesion", "age", "site"]
  assert info.num_examples == {"train": 24, "validation": 8, "test": 8}
  assert info.spacing_mm == pytest.approx((phantom.FOV_MM / 32,) * 2)
  # HU of air maps to the window's bottom: -1 in the model range.
  hu = info.to_physical(batch["image"])[..., 0]
  assert np.percentile(hu, 5) < -950


def test_window_is_a_read_time_choice(config):
  narrow = config.copy_and_resolve_references()
  narrow.ct_window = (-200.0, 200.0)
  narrow.modalities = ("ct",)
  info = data.load_info(narrow)
  assert info.image_shape == (32, 32, 1)
  assert (info.intensity[0].lo, info.intensity[0].hi) == (-200.0, 200.0)
  a = data.load_arrays(narrow, split="test", max_examples=3)
  b = data.load_arrays(config, split="test", max_examples=3)
  wide_hu = data.load_info(config).to_physical(b["image"])[..., 0]
  np.testing.assert_allclose(a["image"][..., 0],
                             np.clip(wide_hu, -200, 200) / 200, atol=2e-3)


def test_same_seed_same_order_and_epochs_are_permutations(config):
  a = _take(data.load_dataset(config, split="train", batch_size=4, seed=3)[0], 12)
  b = _take(data.load_dataset(config, split="train", batch_size=4, seed=3)[0], 12)
  c = _take(data.load_dataset(config, split="train", batch_size=4, seed=4)[0], 6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  ages = np.concatenate([x["age"] + 1000 * x["image"].mean((1, 2, 3)) for x in a])
  first, second = ages[:24], ages[24:48]  # 24 train examples per epoch.
  np.testing.assert_allclose(np.sort(first), np.sort(second), rtol=1e-6)
  assert not np.array_equal(first, second)


def test_state_restore_gives_identical_batches(config):
  it, _ = data.load_dataset(config, split="train", batch_size=4, seed=1)
  _take(it, 7)  # crosses an epoch boundary (6 batches per epoch).
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 5)
  fresh, _ = data.load_dataset(config, split="train", batch_size=4, seed=1)
  fresh.set_state(state)
  for x, y in zip(expected, _take(fresh, 5)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_process_shards_are_disjoint_and_cover(config):
  def keys(index, count):
    it, _ = data.load_dataset(config, split="train", batch_size=1, seed=0,
                              shuffle=False, num_epochs=1, process_index=index,
                              process_count=count)
    return [b["image"].tobytes() for b in it]
  whole = keys(0, 1)
  parts = keys(0, 2) + keys(1, 2)
  assert len(whole) == 24 and sorted(parts) == sorted(whole)


def test_config_errors(config):
  bad = config.copy_and_resolve_references()
  bad.name = "imagenet"
  with pytest.raises(ValueError, match="data.name 'imagenet' unknown"):
    data.load_info(bad)
  bad = config.copy_and_resolve_references()
  bad.modalities = ("ct", "mri")
  with pytest.raises(ValueError, match="unknown modalities"):
    data.load_info(bad)
  bad = config.copy_and_resolve_references()
  bad.image_size = 512
  with pytest.raises(ValueError, match="image_size"):
    data.load_info(bad)
  with pytest.raises(ValueError, match="no split 'holdout'"):
    data.load_dataset(config, split="holdout", batch_size=2, seed=0)


def test_3d_volumes(tmp_path):
  c = data_phantom.get_config("quick,3d")
  c.data_dir = str(tmp_path)
  it, info = data.load_dataset(c, split="train", batch_size=2, seed=0)
  batch = next(it)
  assert batch["image"].shape == (2, 8, 32, 32, 1) == (2,) + info.image_shape
  assert batch["lesion_mask"].shape == (2, 8, 32, 32)
  assert len(info.spacing_mm) == 3
