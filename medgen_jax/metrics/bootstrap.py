"""Bootstrap confidence intervals for two-sample metrics."""
from __future__ import annotations

from typing import Callable

import numpy as np

METHODS = ("percentile", "basic")


def bootstrap_ci(metric_fn: Callable[[np.ndarray, np.ndarray], float], a, b, *,
                 num_resamples: int = 100, seed: int = 0,
                 confidence: float = 0.95, method: str = "percentile",
                 lower_bound: float | None = None) -> dict[str, float]:
  """Bootstrap interval of `metric_fn(a, b)`, resampling both sets.

  Each resample draws `len(a)` rows of `a` and `len(b)` rows of `b` with
  replacement, independently. With `q_lo, q_hi` the resampled quantiles and
  `v` the full-set value, 'percentile' reports `[q_lo, q_hi]` and 'basic'
  `[2 v - q_hi, 2 v - q_lo]`, which subtracts a bias that resampling adds
  again (e.g. the small-sample bias of the Fréchet distance). The interval
  is clipped below at `lower_bound` and widened to contain `v`.

  Args:
    metric_fn: `(a, b) -> float`.
    a: `[n_a, ...]` first sample set (rows are samples).
    b: `[n_b, ...]` second sample set.
    num_resamples: bootstrap replicates (>= 2).
    seed: numpy seed.
    confidence: central interval mass in (0, 1).
    method: 'percentile' or 'basic'.
    lower_bound: smallest value the metric can take (None: no clip).

  Returns:
    {'value': metric on the full sets, 'ci_low', 'ci_high', 'std' (of the
     resampled values), 'num_resamples', 'method'}.
  """
  a, b = np.asarray(a), np.asarray(b)
  if a.ndim < 1 or b.ndim < 1 or len(a) < 1 or len(b) < 1:
    raise ValueError(f"a and b must have at least one row; got shapes "
                     f"{a.shape}, {b.shape}")
  if num_resamples < 2:
    raise ValueError(f"num_resamples must be >= 2, got {num_resamples}")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  rng = np.random.default_rng(seed)
  values = np.asarray([
      float(metric_fn(a[rng.integers(0, len(a), len(a))],
                      b[rng.integers(0, len(b), len(b))]))
      for _ in range(num_resamples)])
  value = float(metric_fn(a, b))
  tail = (1.0 - confidence) / 2.0 * 100.0
  q_lo, q_hi = np.percentile(values, [tail, 100.0 - tail])
  lo, hi = (q_lo, q_hi) if method == "percentile" else (2 * value - q_hi,
                                                       2 * value - q_lo)
  if lower_bound is not None:
    lo, hi = max(lo, lower_bound), max(hi, lower_bound)
  lo, hi = min(lo, value), max(hi, value)
  return {"value": value, "ci_low": float(lo), "ci_high": float(hi),
          "std": float(values.std(ddof=1)), "num_resamples": int(num_resamples),
          "method": method}
