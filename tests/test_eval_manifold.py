"""Precision/recall/density/coverage vs a brute-force loop and known cases."""
import numpy as np
import pytest

from medgen_jax.metrics import manifold


def _prdc_brute(real, fake, k):
  dist = lambda a, b: float(np.sqrt(((a - b) ** 2).sum()))
  def radius(s, i):
    return sorted(dist(s[i], s[j]) for j in range(len(s)) if j != i)[k - 1]
  rr = [radius(real, i) for i in range(len(real))]
  fr = [radius(fake, j) for j in range(len(fake))]
  prec = np.mean([any(dist(f, real[i]) < rr[i] for i in range(len(real)))
                  for f in fake])
  rec = np.mean([any(dist(r, fake[j]) < fr[j] for j in range(len(fake)))
                 for r in real])
  dens = np.mean([sum(dist(f, real[i]) < rr[i] for i in range(len(real)))
                  for f in fake]) / k
  cov = np.mean([min(dist(real[i], f) for f in fake) < rr[i]
                 for i in range(len(real))])
  return dict(precision=prec, recall=rec, density=dens, coverage=cov)


@pytest.mark.parametrize("k", [1, 3])
def test_prdc_matches_brute_force(k):
  rng = np.random.default_rng(0)
  real = rng.normal(size=(30, 4))
  fake = rng.normal(size=(25, 4)) * 1.3 + 0.4
  got = manifold.prdc(real, fake, k=k, chunk_size=7)
  ref = _prdc_brute(real, fake, k)
  for key in ref:
    assert got[key] == pytest.approx(ref[key], abs=1e-9), key
  # Non-trivial case: none of the metrics is at its extreme.
  assert 0 < got["precision"] < 1 or 0 < got["recall"] < 1


def test_identical_sets_are_perfect():
  x = np.random.default_rng(1).normal(size=(50, 8))
  got = manifold.prdc(x, x.copy(), k=5)
  assert got["precision"] == got["recall"] == got["coverage"] == 1.0
  # Each point lies in its own ball and in the balls of the k points that
  # have it among their k nearest neighbours: density is close to 1.
  assert 0.8 < got["density"] < 1.5


def test_disjoint_far_sets_score_zero():
  rng = np.random.default_rng(2)
  real = rng.normal(size=(40, 3))
  got = manifold.prdc(real, rng.normal(size=(40, 3)) + 100.0, k=3)
  assert got == {"precision": 0.0, "recall": 0.0, "density": 0.0,
                 "coverage": 0.0}


def test_knn_radii_brute_force():
  x = np.random.default_rng(3).normal(size=(20, 2))
  full = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  np.fill_diagonal(full, np.inf)
  np.testing.assert_allclose(manifold.knn_radii(x, 2), np.sort(full, 1)[:, 1],
                             rtol=1e-4)


def test_validation():
  x = np.zeros((5, 3))
  with pytest.raises(ValueError, match="needs more than 5 samples"):
    manifold.prdc(x, np.ones((10, 3)), k=5)
  with pytest.raises(ValueError, match="feature dims differ"):
    manifold.prdc(np.ones((10, 3)), np.ones((10, 4)), k=2)


def test_prdc_is_unchanged_by_a_large_common_offset():
  # ||a||^2 + ||b||^2 - 2 a.b in float32 cancels catastrophically at +1e4;
  # centred on the real mean, PRDC equals the float64 brute force.
  rng = np.random.default_rng(4)
  real = rng.normal(size=(60, 16))
  fake = rng.normal(size=(50, 16)) * 1.2 + 0.3
  ref = _prdc_brute(real, fake, 3)
  for offset in (0.0, 1e4):
    for dtype in (np.float64, np.float32):
      got = manifold.prdc((real + offset).astype(dtype),
                          (fake + offset).astype(dtype), k=3, chunk_size=16)
      for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-9), (offset, dtype, key)
  assert 0 < ref["precision"] < 1 and 0 < ref["coverage"] < 1
  np.testing.assert_allclose(manifold.knn_radii(real + 1e4, 3),
                             manifold.knn_radii(real, 3), rtol=1e-5)
