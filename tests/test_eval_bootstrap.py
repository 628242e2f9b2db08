"""Bootstrap intervals: formulas, and coverage of the FD interval on Gaussians."""
import numpy as np
import pytest

from medgen_jax.metrics import bootstrap, distances
from medgen_jax.eval import settings

RESAMPLES = settings.DEFAULTS["bootstrap_resamples"]  # as in the evaluation


def test_basic_interval_reflects_the_resampled_quantiles():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=50), rng.normal(size=60) + 2.0
  fn = lambda u, v: float(v.mean() - u.mean())
  got = bootstrap.bootstrap_ci(fn, a, b, num_resamples=200, seed=3,
                               confidence=0.8, method="basic")
  r = np.random.default_rng(3)
  vals = [fn(a[r.integers(0, 50, 50)], b[r.integers(0, 60, 60)])
          for _ in range(200)]
  q_lo, q_hi = np.percentile(vals, [10, 90])
  v = fn(a, b)
  assert got["value"] == pytest.approx(v)
  assert got["ci_low"] == pytest.approx(2 * v - q_hi)
  assert got["ci_high"] == pytest.approx(2 * v - q_lo)
  pct = bootstrap.bootstrap_ci(fn, a, b, num_resamples=200, seed=3,
                               confidence=0.8)
  assert (pct["ci_low"], pct["ci_high"]) == pytest.approx((q_lo, q_hi))
  with pytest.raises(ValueError, match="method"):
    bootstrap.bootstrap_ci(fn, a, b, method="bca")


@pytest.mark.parametrize("method", bootstrap.METHODS)
def test_interval_contains_the_estimate_and_respects_the_bound(method):
  # n < dim: FD's small-sample bias is large, so resampled values all lie
  # above the estimate (percentile) or the reflection all below (basic).
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(12, 16)), rng.normal(size=(12, 16))
  ci = bootstrap.bootstrap_ci(distances.frechet_distance, x, y,
                              num_resamples=10, method=method, lower_bound=0.0)
  assert 0.0 <= ci["ci_low"] <= ci["value"] <= ci["ci_high"]


def _gaussians(rng, dim):
  # Diagonal covariances: FD = ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
  a = rng.uniform(0.5, 2.0, dim)
  b = a * rng.uniform(0.6, 1.4, dim)
  mu = rng.normal(size=dim) * np.sqrt(8.0 / dim)
  truth = float(mu @ mu + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
  return a, b, mu, truth


def _coverage(dim, n1, n2, trials, confidence=0.9, seed=0):
  """Fraction of trials whose interval contains the true FD, per method."""
  rng = np.random.default_rng(seed)
  a, b, mu, truth = _gaussians(rng, dim)
  hits = dict.fromkeys(bootstrap.METHODS, 0)
  for t in range(trials):
    x = rng.normal(size=(n1, dim)) * np.sqrt(a)
    y = rng.normal(size=(n2, dim)) * np.sqrt(b) + mu
    for method in hits:
      ci = bootstrap.bootstrap_ci(distances.frechet_distance, x, y,
                                  num_resamples=RESAMPLES, seed=t,
                                  confidence=confidence, method=method,
                                  lower_bound=0.0)
      hits[method] += ci["ci_low"] <= truth <= ci["ci_high"]
  return {m: h / trials for m, h in hits.items()}


# The evaluation's 2D sizes (64 features, 3,200 train vs 320 generated, and
# 320 vs 320) scaled to 16 features with the same features-per-sample ratio.
@pytest.mark.parametrize("n1,n2", [(80, 80), (800, 80)])
def test_fd_basic_interval_covers_the_true_distance(n1, n2):
  cov = _coverage(16, n1, n2, trials=40)
  assert cov["basic"] >= 0.85, cov
  assert cov["percentile"] <= 0.5, cov  # the test tells the methods apart


@pytest.mark.slow
@pytest.mark.parametrize("n1,n2", [(320, 320), (3200, 320)])
def test_fd_basic_interval_covers_at_evaluation_sizes(n1, n2):
  cov = _coverage(64, n1, n2, trials=40)
  assert cov["basic"] >= 0.85, cov
  assert cov["percentile"] <= 0.5, cov


@pytest.mark.slow
@pytest.mark.xfail(reason="with as many features as generated samples (3D: "
                   "64 volumes, 64 features) the bootstrap underestimates "
                   "FD's bias and the basic interval under-covers", strict=False)
def test_fd_basic_interval_at_3d_sizes():
  cov = _coverage(64, 400, 64, trials=40)
  assert cov["basic"] >= 0.85, cov
