"""k-NN manifold metrics: precision, recall, density, coverage.

Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative
Models", with the semantics of their reference code (`prdc`):

- radius of a point = distance to its k-th nearest neighbour in its own set,
  the point itself excluded;
- a sample is inside a ball when its distance is strictly smaller than the
  radius, so identical real and fake sets give precision = recall =
  coverage = 1 (a point is at distance 0 < radius from its own copy);
- precision: fraction of fake samples inside at least one real ball;
- recall: fraction of real samples inside at least one fake ball;
- density: (1/k) * mean over fakes of the number of real balls containing it;
- coverage: fraction of real samples whose nearest fake is inside their ball.

Distances are computed in chunks, so memory is O(chunk_size * n), on
features centred on the real mean (the metrics are translation invariant, and
centring keeps a large common offset from cancelling in float32).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from medgen_jax.metrics import distances


def knn_radii(features, k: int, *, chunk_size: int = 1024) -> np.ndarray:
  """Distance of every row of `[n, dim]` to its k-th nearest other row: `[n]`."""
  x = np.asarray(features)
  if x.ndim != 2:
    raise ValueError(f"features must be [num_samples, dim], got {x.shape}")
  if not 1 <= k < x.shape[0]:
    raise ValueError(f"k-NN radii need 1 <= k < num_samples; got k={k} with "
                     f"{x.shape[0]} samples")
  # k + 1 neighbours: the nearest is the point itself (distance ~0).
  d, _ = distances.nearest_neighbors(x, x, k=k + 1, chunk_size=chunk_size)
  return d[:, k]


@jax.jit
def _ball_counts(q, ref, ref_sq, radii):
  sq = (jnp.sum(q * q, axis=1, keepdims=True) + ref_sq[None, :]
        - 2.0 * jnp.matmul(q, ref.T, precision=jax.lax.Precision.HIGHEST))
  dist = jnp.sqrt(jnp.clip(sq, 0.0))
  return jnp.sum(dist < radii[None, :], axis=1)


def _count_balls(queries, centres, radii, chunk_size):
  """For each query row, how many centre balls contain it: `[num_queries]`."""
  q = queries.astype(np.float32)
  c = jnp.asarray(centres, jnp.float32)
  c_sq = jnp.sum(c * c, axis=1)
  r = jnp.asarray(radii, jnp.float32)
  chunk = min(chunk_size, q.shape[0])
  out = []
  for start in range(0, q.shape[0], chunk):
    block = q[start:start + chunk]
    pad = chunk - block.shape[0]
    counts = _ball_counts(jnp.asarray(np.pad(block, ((0, pad), (0, 0)))), c,
                          c_sq, r)
    out.append(np.asarray(counts)[:chunk - pad])
  return np.concatenate(out)


def prdc(real_features, fake_features, *, k: int = 5,
         chunk_size: int = 1024) -> dict[str, float]:
  """Precision, recall, density and coverage of fake vs real features.

  Args:
    real_features: `[n_real, dim]`, n_real > k.
    fake_features: `[n_fake, dim]`, n_fake > k.
    k: neighbourhood size (Naeem et al. use 5).
    chunk_size: rows per distance block.

  Returns:
    {'precision', 'recall', 'density', 'coverage'} as python floats.
  """
  real = distances.check_features("real_features", real_features)
  fake = distances.check_features("fake_features", fake_features)
  distances.check_same_dim(real, fake)
  for name, x in (("real_features", real), ("fake_features", fake)):
    if x.shape[0] <= k:
      raise ValueError(f"{name}: k-NN with k={k} needs more than {k} samples, "
                       f"got {x.shape[0]}")
  mean = real.mean(axis=0, dtype=np.float64)
  real, fake = distances.centred(real, mean), distances.centred(fake, mean)
  real_r = knn_radii(real, k, chunk_size=chunk_size)
  fake_r = knn_radii(fake, k, chunk_size=chunk_size)
  fake_in_real = _count_balls(fake, real, real_r, chunk_size)
  real_in_fake = _count_balls(real, fake, fake_r, chunk_size)
  nearest_fake, _ = distances.nearest_neighbors(real, fake, k=1,
                                                chunk_size=chunk_size)
  return {
      "precision": float(np.mean(fake_in_real > 0)),
      "recall": float(np.mean(real_in_fake > 0)),
      "density": float(np.mean(fake_in_real) / k),
      "coverage": float(np.mean(nearest_fake[:, 0] < real_r)),
  }
