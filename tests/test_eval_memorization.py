"""Memorisation audit: copies are flagged, independent samples are not."""
import numpy as np
import pytest

from medgen_jax.eval import memorization


def _images(rng, n):
  return rng.uniform(-1, 1, size=(n, 8, 8, 1)).astype(np.float32)


def test_copies_are_flagged_and_independent_samples_are_not():
  rng = np.random.default_rng(0)
  train, test = _images(rng, 300), _images(rng, 200)
  fresh = _images(rng, 40)
  copies = train[[3, 17, 250, 99, 5]]
  generated = np.concatenate([fresh[:35], copies])
  audit = memorization.memorization_audit(generated, train, test, chunk_size=64)
  assert audit["memorized_fraction"] >= 5 / 40
  np.testing.assert_array_equal(audit["gen_nearest_train"][35:],
                                [3, 17, 250, 99, 5])
  assert np.all(audit["gen_to_train"][35:] < 1e-2)
  gi, ti = memorization.closest_pairs(audit, 5)
  assert sorted(gi) == list(range(35, 40))
  np.testing.assert_array_equal(ti, audit["gen_nearest_train"][gi])
  # Independent samples: essentially nothing below the 1st percentile.
  clean = memorization.memorization_audit(fresh, train, test)
  assert clean["memorized_fraction"] <= 0.05
  assert clean["test_memorized_fraction"] == pytest.approx(0.01, abs=0.006)


def test_distances_match_brute_force():
  rng = np.random.default_rng(1)
  gen, train, test = (rng.normal(size=(n, 6)) for n in (13, 29, 11))
  audit = memorization.memorization_audit(gen, train, test, percentile=10,
                                          chunk_size=4)
  full = np.sqrt(((gen[:, None] - train[None]) ** 2).sum(-1))
  np.testing.assert_allclose(audit["gen_to_train"], full.min(1), rtol=1e-4)
  np.testing.assert_array_equal(audit["gen_nearest_train"], full.argmin(1))
  ref = np.sqrt(((test[:, None] - train[None]) ** 2).sum(-1)).min(1)
  assert audit["threshold"] == pytest.approx(np.percentile(ref, 10), rel=1e-4)


def test_png_is_written(tmp_path):
  rng = np.random.default_rng(2)
  train = _images(rng, 20)
  gen = np.concatenate([_images(rng, 4), train[:2]])
  audit = memorization.memorization_audit(gen, train, _images(rng, 10))
  path = memorization.save_closest_pairs_png(tmp_path / "pairs.png", gen, train,
                                             audit, num_pairs=3)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_validation():
  x = np.zeros((4, 3))
  with pytest.raises(ValueError, match="generated has 4 values"):
    memorization.memorization_audit(np.zeros((4, 4)), x, x)
  with pytest.raises(ValueError, match="percentile"):
    memorization.memorization_audit(x, x, x, percentile=0)
