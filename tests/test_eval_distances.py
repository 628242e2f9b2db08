"""Fréchet distance, KID, k-NN and bootstrap against scipy / brute force."""
import numpy as np
import pytest
import scipy.linalg

from medgen_jax.metrics import bootstrap, distances


def _scipy_fd(x, y):
  mu1, mu2 = x.mean(0), y.mean(0)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  covmean = np.real(covmean)
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(covmean))


@pytest.mark.parametrize("n,dim", [(200, 8), (300, 16)])
def test_fd_matches_scipy_full_rank(n, dim):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
  y = rng.normal(size=(n, dim)) * 1.5 + 0.3
  np.testing.assert_allclose(distances.frechet_distance(x, y), _scipy_fd(x, y),
                             rtol=1e-6)


def test_fd_rank_deficient_matches_psd_reference():
  # n < dim: both covariances are singular. Reference: trace of the PSD square
  # root of s1^{1/2} s2 s1^{1/2} with scipy, independently of our eigh path.
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 0.5
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  r1 = np.real(scipy.linalg.sqrtm(s1))
  inner = np.real(scipy.linalg.sqrtm(r1 @ s2 @ r1))
  ref = (((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
         - 2 * np.trace(inner))
  got = distances.frechet_distance(x, y)
  assert np.isfinite(got)
  np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_fd_known_answers():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(500, 6))
  assert distances.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
  shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
  # Same covariance exactly (a translated copy): FD = ||shift||^2.
  assert distances.frechet_distance(x, x + shift) == pytest.approx(
      float(shift @ shift), rel=1e-8)
  # Identical fp32 rank-deficient sets (n < dim) still give ~0.
  z = rng.normal(size=(5, 20)).astype(np.float32)
  assert distances.frechet_distance(z, z) < 1e-5


def test_fd_from_stats_gaussians():
  # Closed form for commuting diagonal covariances:
  # sum (sqrt(a) - sqrt(b))^2 + ||mu1 - mu2||^2.
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
  got = distances.frechet_distance_from_stats(np.zeros(3), np.diag(a),
                                              np.ones(3), np.diag(b))
  assert got == pytest.approx(3 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def _kid_brute(x, y):
  m, d = len(x), x.shape[1]
  k = lambda u, v: (u @ v / d + 1) ** 3
  kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return kxx / (m * (m - 1)) + kyy / (m * (m - 1)) - 2 * kxy / m ** 2


def _kid_full_brute(x, y):
  # The unbiased estimator on the full sets (sizes may differ): off-diagonal
  # kxx and kyy means, minus twice the mean over every x-y pair.
  n1, n2, d = len(x), len(y), x.shape[1]
  k = lambda u, v: (u @ v / d + 1) ** 3
  kxx = sum(k(x[i], x[j]) for i in range(n1) for j in range(n1) if i != j)
  kyy = sum(k(y[i], y[j]) for i in range(n2) for j in range(n2) if i != j)
  kxy = sum(k(x[i], y[j]) for i in range(n1) for j in range(n2))
  return kxx / (n1 * (n1 - 1)) + kyy / (n2 * (n2 - 1)) - 2 * kxy / (n1 * n2)


def test_kid_equal_sizes_has_a_spread():
  # A subset as large as the set would be the whole set every time (std 0
  # with equal sizes); subsets of at most half the smaller set vary.
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(320, 16)), rng.normal(size=(320, 16)) + 0.3
  mean, std = distances.kernel_inception_distance(x, y, num_subsets=20,
                                                  subset_size=1000)
  assert std > 0.05 * abs(mean) > 0


def test_kid_mean_is_the_full_set_unbiased_estimator():
  # Each subset value is the torch-fidelity estimator on that subset (next
  # test); its expectation over the draws is the full-set estimator, so the
  # mean over many subsets converges to the brute-force full-set value.
  rng = np.random.default_rng(8)
  x, y = rng.normal(size=(24, 4)), rng.normal(size=(18, 4)) * 1.2 + 0.5
  n = 4000
  mean, std = distances.kernel_inception_distance(x, y, num_subsets=n,
                                                  subset_size=1000, seed=1)
  ref = _kid_full_brute(x, y)
  assert std > 0
  assert abs(mean - ref) < 4 * std / np.sqrt(n)
  assert abs(mean - ref) < 0.05 * abs(ref)


def test_kid_subsets_mean_and_std():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(40, 4)), rng.normal(size=(30, 4)) + 1.0
  mean, std = distances.kernel_inception_distance(x, y, num_subsets=5,
                                                  subset_size=10, seed=7)
  # Same draws as the implementation (documented: numpy choice per subset).
  r = np.random.default_rng(7)
  vals = []
  for _ in range(5):
    ix, iy = r.choice(40, 10, replace=False), r.choice(30, 10, replace=False)
    vals.append(_kid_brute(x[ix], y[iy]))
  np.testing.assert_allclose([mean, std], [np.mean(vals), np.std(vals)],
                             rtol=1e-8)
  # Unbiased: a second draw from the same distribution scores ~0 (not the
  # same rows: the x-y cross term keeps its diagonal, so MMD^2(x, x) < 0).
  x2 = rng.normal(size=(400, 4))
  x3 = rng.normal(size=(400, 4))
  same, _ = distances.kernel_inception_distance(x2, x3, num_subsets=4,
                                                subset_size=400)
  assert abs(same) < 0.1 * mean


def test_nearest_neighbors_vs_brute_force():
  rng = np.random.default_rng(5)
  q, ref = rng.normal(size=(37, 6)), rng.normal(size=(50, 6))
  d, i = distances.nearest_neighbors(q, ref, k=3, chunk_size=8)
  full = np.sqrt(((q[:, None] - ref[None]) ** 2).sum(-1))
  np.testing.assert_array_equal(i, np.argsort(full, axis=1)[:, :3])
  np.testing.assert_allclose(d, np.sort(full, axis=1)[:, :3], rtol=1e-4)
  np.testing.assert_allclose(distances.pairwise_distances(q, ref), full,
                             rtol=1e-4)
  # Copies are at distance exactly 0, also far from the origin.
  d0, i0 = distances.nearest_neighbors(ref[[4, 9]] + 50.0, ref + 50.0, k=2)
  np.testing.assert_array_equal(d0[:, 0], 0.0)
  np.testing.assert_array_equal(i0[:, 0], [4, 9])


def test_validation_errors():
  x = np.zeros((5, 3))
  with pytest.raises(ValueError, match="feature dims differ"):
    distances.frechet_distance(x, np.zeros((5, 4)))
  with pytest.raises(ValueError, match="at least 2 samples"):
    distances.frechet_distance(x[:1], x)
  with pytest.raises(ValueError, match=r"\[num_samples, dim\]"):
    distances.kernel_inception_distance(np.zeros(5), x)
  with pytest.raises(ValueError, match="at least 4 samples"):
    distances.kernel_inception_distance(x[:3], x)
  with pytest.raises(ValueError, match="k must be"):
    distances.nearest_neighbors(x, x, k=6)
  with pytest.raises(ValueError, match="NaN"):
    distances.frechet_distance(np.full((4, 3), np.nan), x)


def test_bootstrap_ci_of_mean_difference():
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=200), rng.normal(size=300) + 1.0
  fn = lambda u, v: v.mean() - u.mean()
  out = bootstrap.bootstrap_ci(fn, a, b, num_resamples=300, seed=0)
  assert out["value"] == pytest.approx(b.mean() - a.mean())
  assert out["ci_low"] < out["value"] < out["ci_high"]
  # Bootstrap std ~ analytic standard error of a mean difference.
  se = np.sqrt(a.var() / 200 + b.var() / 300)
  assert out["std"] == pytest.approx(se, rel=0.2)
  with pytest.raises(ValueError, match="num_resamples"):
    bootstrap.bootstrap_ci(fn, a, b, num_resamples=1)
