"""Bootstrap confidence intervals for two-sample metrics."""
from __future__ import annotations

from typing import Callable

import numpy as np


def bootstrap_ci(metric_fn: Callable[[np.ndarray, np.ndarray], float], a, b, *,
                 num_resamples: int = 100, seed: int = 0,
                 confidence: float = 0.95) -> dict[str, float]:
  """Percentile bootstrap of `metric_fn(a, b)`, resampling both sets.

  Each resample draws `len(a)` rows of `a` and `len(b)` rows of `b` with
  replacement, independently. Only use it where the metric is cheap. Metrics
  that use k-NN radii see duplicated rows in a resample (zero distances), which
  biases them; report their bootstrap CI with that caveat.

  Args:
    metric_fn: `(a, b) -> float`.
    a: `[n_a, ...]` first sample set (rows are samples).
    b: `[n_b, ...]` second sample set.
    num_resamples: bootstrap replicates (>= 2).
    seed: numpy seed.
    confidence: central interval mass in (0, 1).

  Returns:
    {'value': metric on the full sets, 'ci_low', 'ci_high', 'std',
     'num_resamples'}.
  """
  a, b = np.asarray(a), np.asarray(b)
  if a.ndim < 1 or b.ndim < 1 or len(a) < 1 or len(b) < 1:
    raise ValueError(f"a and b must have at least one row; got shapes "
                     f"{a.shape}, {b.shape}")
  if num_resamples < 2:
    raise ValueError(f"num_resamples must be >= 2, got {num_resamples}")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  rng = np.random.default_rng(seed)
  values = np.asarray([
      float(metric_fn(a[rng.integers(0, len(a), len(a))],
                      b[rng.integers(0, len(b), len(b))]))
      for _ in range(num_resamples)])
  tail = (1.0 - confidence) / 2.0 * 100.0
  lo, hi = np.percentile(values, [tail, 100.0 - tail])
  return {"value": float(metric_fn(a, b)), "ci_low": float(lo),
          "ci_high": float(hi), "std": float(values.std(ddof=1)),
          "num_resamples": int(num_resamples)}
