"""Memorisation audit: copies are flagged, independent samples are not."""
import numpy as np
import pytest

from medgen_jax.metrics import memorization


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
  # Independent samples, and the real-vs-real reference: ~nothing flagged.
  clean = memorization.memorization_audit(fresh, train, test)
  assert clean["memorized_fraction"] <= 0.025
  assert clean["test_memorized_fraction"] <= 0.01
  assert clean["num_test"] == 200 and "of 200 test" in clean["threshold_rule"]


def test_copies_among_the_test_references_leave_the_threshold_positive():
  # 2 % of the test set and 2 % of the generated set are exact training
  # copies. A 1st-percentile threshold would be 0 and flag nothing.
  rng = np.random.default_rng(3)
  train = _images(rng, 300)
  test = np.concatenate([_images(rng, 196), train[[7, 8, 9, 10]]])
  generated = np.concatenate([_images(rng, 98), train[[20, 21]]])
  audit = memorization.memorization_audit(generated, train, test)
  assert np.percentile(audit["test_to_train"], 1) < 1e-2
  assert audit["threshold"] > 0.5 * np.median(audit["test_to_train"])
  flagged = np.flatnonzero(audit["gen_to_train"] < audit["threshold"])
  np.testing.assert_array_equal(flagged, [98, 99])
  assert audit["memorized_fraction"] == pytest.approx(0.02)
  assert audit["test_memorized_fraction"] == pytest.approx(0.02)


def test_64_test_references_read_zero_for_new_samples():
  # The 3D evaluation's size: 64 test volumes. New samples (and the test set
  # itself) are not flagged; copies are.
  rng = np.random.default_rng(4)
  train, test, fresh = _images(rng, 400), _images(rng, 64), _images(rng, 64)
  audit = memorization.memorization_audit(np.concatenate([fresh, train[:1]]),
                                          train, test)
  assert audit["test_memorized_fraction"] == 0.0
  np.testing.assert_array_equal(
      np.flatnonzero(audit["gen_to_train"] < audit["threshold"]), [64])
  assert "of 64 test" in audit["threshold_rule"]


def test_robust_threshold_rule():
  d = np.array([1.0, 2.0, 3.0, 4.0, 10.0])  # median 3, MAD 1
  assert memorization.robust_threshold(d, mad_k=1.0) == pytest.approx(
      3.0 - 1.4826)
  # A wide spread would put the rule below 0: the floor keeps it positive.
  assert memorization.robust_threshold(d, mad_k=4.0, min_fraction=0.1) == (
      pytest.approx(0.3))
  # Robust: 5 % of zeros barely move it.
  clean = 5.0 + 0.2 * np.random.default_rng(0).normal(size=95)
  with_zeros = np.concatenate([clean, np.zeros(5)])
  t = memorization.robust_threshold(clean)
  assert 3.5 < t < 4.5
  assert memorization.robust_threshold(with_zeros) == pytest.approx(t, rel=0.05)


def test_distances_match_brute_force():
  rng = np.random.default_rng(1)
  gen, train, test = (rng.normal(size=(n, 6)) for n in (13, 29, 11))
  audit = memorization.memorization_audit(gen, train, test, mad_k=1.0,
                                          chunk_size=4)
  full = np.sqrt(((gen[:, None] - train[None]) ** 2).sum(-1))
  np.testing.assert_allclose(audit["gen_to_train"], full.min(1), rtol=1e-4)
  np.testing.assert_array_equal(audit["gen_nearest_train"], full.argmin(1))
  ref = np.sqrt(((test[:, None] - train[None]) ** 2).sum(-1)).min(1)
  med = np.median(ref)
  want = max(med - 1.4826 * np.median(np.abs(ref - med)), 0.1 * med)
  assert audit["threshold"] == pytest.approx(want, rel=1e-4)


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
  with pytest.raises(ValueError, match="mad_k"):
    memorization.memorization_audit(x, x, x, mad_k=-1.0)
  with pytest.raises(ValueError, match="min_fraction"):
    memorization.memorization_audit(x, x, x, min_fraction=0.0)


def test_audit_is_unchanged_by_a_large_common_offset():
  rng = np.random.default_rng(5)
  gen, train, test = (rng.normal(size=(n, 32)) for n in (40, 120, 50))
  gen[:2] = train[[5, 6]]
  base = memorization.memorization_audit(gen, train, test)
  moved = memorization.memorization_audit(gen + 1e4, train + 1e4, test + 1e4)
  np.testing.assert_array_equal(moved["gen_nearest_train"],
                                base["gen_nearest_train"])
  full = np.sqrt(((gen[:, None] - train[None]) ** 2).sum(-1)).min(1)
  np.testing.assert_allclose(moved["gen_to_train"], full, rtol=1e-5, atol=1e-5)
  assert moved["threshold"] == pytest.approx(base["threshold"], rel=1e-5)
  assert moved["memorized_fraction"] == base["memorized_fraction"] == 2 / 40
