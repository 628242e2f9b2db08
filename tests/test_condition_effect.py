"""The condition-effect diagnosis against hand-computed cases: a generator
that ignores a condition reads 0, one with a known linear response reads it."""
import numpy as np
import pytest

from medgen_jax.data.info import (CATEGORICAL, CONTINUOUS, ConditionField, DatasetInfo,
                                  IntensityTransform)
from medgen_jax.eval.condition_effect import condition_effect, switched_values

INFO = DatasetInfo(
    name="toy", image_shape=(4, 4, 1), modalities=("ct",),
    intensity=(IntensityTransform("ct", "HU", -1000.0, 1000.0),),
    conditions=(ConditionField("lesion", CATEGORICAL, 3, ("none", "small", "large")),
                ConditionField("site", CATEGORICAL, 2, ("a", "b")),
                ConditionField("age", CONTINUOUS, value_range=(20.0, 100.0))))
N = 6
REQUESTED = {"lesion": np.array([0, 1, 2, 0, 1, 2], np.int32),
             "site": np.zeros(N, np.int32), "age": np.full(N, 50.0, np.float32)}


def noise(seed, n):
  return np.random.default_rng(seed).normal(size=(n, 4, 4, 1))


def linear(conditions, seed):
  """x = 0.1 * lesion + 0.01 * age + noise(seed): site is ignored."""
  lesion = np.asarray(conditions["lesion"], np.float64)[:, None, None, None]
  age = np.asarray(conditions["age"], np.float64)[:, None, None, None]
  return 0.1 * lesion + 0.01 * age + noise(seed, len(lesion))


def test_linear_response_is_read_exactly_and_an_ignored_condition_reads_zero():
  out = condition_effect(linear, REQUESTED, INFO, num=4, seed=3)
  d = noise(3, 4) - noise(4, 4)
  expected_noise = np.mean(np.sqrt(np.mean(d.reshape(4, -1) ** 2, axis=1)))
  np.testing.assert_allclose(out["condition_effect_noise"], expected_noise, rtol=1e-12)
  # Class pairs (0,1), (0,2), (1,2) differ by 0.1, 0.2, 0.1 at every pixel.
  np.testing.assert_allclose(out["condition_effect_lesion"], 0.4 / 3, rtol=1e-12)
  # Age is switched between 40 and 80 years: 0.01 * 40 at every pixel.
  np.testing.assert_allclose(out["condition_effect_age"], 0.4, rtol=1e-12)
  assert out["condition_effect_site"] == 0.0 and out["condition_effect_site_ratio"] == 0.0
  np.testing.assert_allclose(out["condition_effect_lesion_ratio"],
                             (0.4 / 3) / expected_noise, rtol=1e-12)


def test_switched_values_and_bad_sizes():
  assert switched_values(INFO.condition("lesion")) == (0, 1, 2)
  assert switched_values(INFO.condition("age")) == (40.0, 80.0)
  for num in (0, N + 1):
    with pytest.raises(ValueError, match="condition_effect_samples"):
      condition_effect(linear, REQUESTED, INFO, num=num, seed=0)
  unconditional = DatasetInfo(name="u", image_shape=(4, 4, 1), modalities=("ct",),
                              intensity=INFO.intensity)
  assert condition_effect(linear, {}, unconditional, num=1, seed=0) == {}
