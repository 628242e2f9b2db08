"""The training-time sample-variety measure, against brute force and in the loop's log."""
import itertools
import json

import numpy as np
import pytest

from medgen_jax.train import variety
from medgen_jax.train.loop import run_training
from conftest import INFO, TinyD, TinyG, tiny_iterator, tiny_loop_config


def _brute_force(images, groups):
  dists = [np.mean(np.abs(images[i] - images[j]))
           for i, j in itertools.combinations(range(len(images)), 2)
           if groups[i] == groups[j] and groups[i] >= 0]
  return float(np.mean(dists)), len(dists)


def test_mean_pair_distance_matches_brute_force():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (11, 4, 5, 2)).astype(np.float32)
  groups = np.array([0, 1, 0, 2, 1, 0, -1, 2, 2, 1, -1])  # -1 (unknown) pairs with nothing
  want, pairs = _brute_force(images, groups)
  total, count = variety.pair_distance_sums(images, groups)
  assert count == pairs == 3 + 3 + 3
  np.testing.assert_allclose(total / count, want, rtol=1e-6)
  np.testing.assert_allclose(variety.mean_pair_distance(images, groups), want, rtol=1e-6)


def test_hand_computed_case_and_collapse_is_zero():
  # Two images in one group differing by 0.5 in half of their 4 pixels: 0.25.
  a = np.zeros((2, 2, 1), np.float32)
  b = a.copy()
  b[0] = 0.5
  assert variety.mean_pair_distance(np.stack([a, b]), np.array([3, 3])) == 0.25
  same = np.repeat(a[None], 5, axis=0)
  assert variety.mean_pair_distance(same, np.zeros(5, int)) == 0.0
  assert np.isnan(variety.mean_pair_distance(same[:1], np.zeros(1, int)))


def test_meter_pools_real_batches_before_dividing():
  rng = np.random.default_rng(1)
  batches = [{"image": rng.normal(size=(n, 3, 3, 1)), "lesion": rng.integers(0, 2, n)}
             for n in (4, 9)]
  meter = variety.VarietyMeter("lesion")
  for b in batches:
    meter.add_real(b)
  sums = [variety.pair_distance_sums(b["image"], b["lesion"]) for b in batches]
  want_real = sum(s for s, _ in sums) / sum(c for _, c in sums)
  samples = rng.normal(size=(6, 3, 3, 1))
  cond = {"lesion": np.array([0, 0, 0, 1, 1, 1])}
  out = meter.score(samples, cond)
  np.testing.assert_allclose(out["variety_real"], want_real, rtol=1e-9)
  np.testing.assert_allclose(out["variety_ema"], _brute_force(samples, cond["lesion"])[0],
                             rtol=1e-6)
  np.testing.assert_allclose(out["variety_ratio"], out["variety_ema"] / want_real, rtol=1e-9)


@pytest.mark.slow  # the loop around the measure (~15 s); the measure itself is checked above
def test_loop_logs_variety_on_sample_steps(tmp_path):
  config = tiny_loop_config(num_steps=4, sample_every=2, checkpoint_every=4)
  summary = run_training(config, str(tmp_path), info=INFO, generator=TinyG(),
                         discriminator=TinyD(), iterator=tiny_iterator())
  rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl"))}
  assert "variety_ema" not in rows[1]  # no grid sampled yet
  for step in (2, 3, 4):
    assert rows[step]["variety_real"] > 0 and rows[step]["variety_ema"] >= 0
  # The real reference pools every batch seen: uniform [-1, 1] pixels differ by 2/3 on average.
  np.testing.assert_allclose(rows[4]["variety_real"], 2 / 3, rtol=0.1)
  assert summary["variety"]["variety_ema"] == rows[4]["variety_ema"]
