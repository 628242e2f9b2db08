"""Downstream augmentation experiment: metrics by hand, protocol, quick run."""
import json
import os

import numpy as np
import pytest

from configs import downstream_lesion
from medgen_jax import data as data_lib
from medgen_jax.eval import downstream


def test_macro_f1_and_accuracy_hand_computed():
  true = [0, 0, 1, 1, 2, 2]
  pred = [0, 1, 1, 1, 0, 2]
  # class 0: tp 1 fp 1 fn 1 -> 2/4; class 1: tp 2 fp 1 fn 0 -> 4/5;
  # class 2: tp 1 fp 0 fn 1 -> 2/3.
  assert downstream.macro_f1(pred, true, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
  assert downstream.accuracy(pred, true) == pytest.approx(4 / 6)
  # Class 2 never occurs in labels nor predictions: left out of the mean.
  assert downstream.macro_f1([0, 1], [0, 1], 3) == 1.0
  # Predicted but absent class scores 0.
  assert downstream.macro_f1([0, 2], [0, 0], 3) == pytest.approx((2 / 3 + 0) / 2)
  np.testing.assert_array_equal(downstream.confusion(pred, true, 3),
                                [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
  with pytest.raises(ValueError, match="outside"):
    downstream.confusion([3], [0], 3)


def test_balanced_conditions():
  info = data_lib.load_info(downstream_lesion.get_config("quick").data)
  pool = {"lesion": np.array([0, 0, 0], np.int32),
          "age": np.array([30.0, 40.0, 50.0], np.float32),
          "site": np.array([1, 2, 3], np.int32)}
  cond = downstream.balanced_conditions(info, "lesion", pool, 9, seed=0)
  np.testing.assert_array_equal(np.bincount(cond["lesion"]), [3, 3, 3])
  # The other fields are whole rows of the pool (age 30 goes with site 1).
  assert set(zip(cond["age"].tolist(), cond["site"].tolist())) <= {
      (30.0, 1), (40.0, 2), (50.0, 3)}
  with pytest.raises(ValueError, match="categorical"):
    downstream.balanced_conditions(info, "age", pool, 3, seed=0)


def test_quick_run_three_arms(tmp_path):
  config = downstream_lesion.get_config("quick")
  train = data_lib.load_arrays(config.data, split="train")

  def oracle(cond, seed):
    """Real training images of the requested class: the best a generator can do."""
    rng = np.random.default_rng(seed)
    return np.stack([train["image"][rng.choice(np.flatnonzero(train["lesion"] == c))]
                     for c in cond["lesion"]])

  def noise(cond, seed):
    shape = (len(cond["lesion"]), *train["image"].shape[1:])
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)

  res = downstream.run_downstream(config, str(tmp_path),
                                  generators={"transformer": oracle, "cnn": noise})
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert list(saved["arms"]) == ["real", "real+transformer", "real+cnn"]
  num_test = saved["protocol"]["num_test"]
  for arm, entry in saved["arms"].items():
    for m in ("macro_f1", "accuracy"):
      vals = entry[m]["values"]
      assert len(vals) == len(config.seeds) >= 2, arm
      assert entry[m]["mean"] == pytest.approx(np.mean(vals))
      assert entry[m]["std"] == pytest.approx(np.std(vals, ddof=1))
    # The stored confusion matrices reproduce the stored scores.
    for conf, f1, acc in zip(entry["confusion_per_seed"],
                             entry["macro_f1"]["values"],
                             entry["accuracy"]["values"]):
      conf = np.asarray(conf)
      assert conf.sum() == num_test
      assert acc == pytest.approx(np.trace(conf) / num_test)
      true = np.repeat(np.arange(3), conf.sum(1))
      pred = np.concatenate([np.repeat(np.arange(3), row) for row in conf])
      assert f1 == pytest.approx(downstream.macro_f1(pred, true, 3))
    if arm != "real":
      diff = entry["paired_difference_to_real"]["accuracy"]["values"]
      np.testing.assert_allclose(
          diff, np.subtract(entry["accuracy"]["values"],
                            saved["arms"]["real"]["accuracy"]["values"]))
  assert saved["protocol"]["num_real"] == config.num_real
  assert os.path.getsize(res["figure"]) > 1000


def test_bad_config(tmp_path):
  config = downstream_lesion.get_config("quick")
  config.field = "age"
  with pytest.raises(ValueError, match="categorical"):
    downstream.run_downstream(config, str(tmp_path), generators={})
  config = downstream_lesion.get_config("quick")
  config.generator_configs.cnn.data.image_size = 64
  with pytest.raises(ValueError, match="other data"):
    downstream.run_downstream(config, str(tmp_path))
