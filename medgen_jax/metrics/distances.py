"""Distances between feature sets: Fréchet distance, KID, chunked k-NN.

All functions take feature arrays `[num_samples, dim]` (e.g. penultimate
activations of the domain feature extractor, `medgen_jax.classifier`).

The Fréchet distance is computed in float64 (inside `jax.enable_x64`) with
the trace of the matrix square root taken from the symmetric product
`sigma1^{1/2} sigma2 sigma1^{1/2}`: it has the same eigenvalues as
`sigma1 sigma2`, is symmetric positive semi-definite, so `eigvalsh` applies and
tiny negative eigenvalues from round-off are clipped to zero. This stays stable
for rank-deficient covariances (fewer samples than dimensions), where the
classic `scipy.linalg.sqrtm(sigma1 @ sigma2)` returns complex noise.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def check_features(name: str, x, min_samples: int = 1) -> np.ndarray:
  """`x` as a finite numpy `[num_samples, dim]` array, or a ValueError naming it."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [num_samples, dim], got shape {x.shape}")
  if x.shape[0] < min_samples:
    raise ValueError(f"{name} needs at least {min_samples} samples, got "
                     f"{x.shape[0]}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or inf")
  return x


def check_same_dim(x: np.ndarray, y: np.ndarray) -> None:
  """Raises a ValueError when two feature sets have different dims."""
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"feature dims differ: {x.shape[1]} vs {y.shape[1]}")


def gaussian_fit(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean `[dim]` and unbiased covariance `[dim, dim]` (float64) of `[n, dim]`."""
  x = check_features("features", features, min_samples=2).astype(np.float64)
  return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


@jax.jit
def _frechet_from_stats(mu1, sigma1, mu2, sigma2):
  # sigma1^{1/2} via eigh; clipping makes round-off negatives harmless.
  w1, v1 = jnp.linalg.eigh(sigma1)
  sqrt1 = (v1 * jnp.sqrt(jnp.clip(w1, 0.0))) @ v1.T
  m = sqrt1 @ sigma2 @ sqrt1
  m = 0.5 * (m + m.T)
  tr_covmean = jnp.sum(jnp.sqrt(jnp.clip(jnp.linalg.eigvalsh(m), 0.0)))
  diff = mu1 - mu2
  return diff @ diff + jnp.trace(sigma1) + jnp.trace(sigma2) - 2.0 * tr_covmean


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1, mu2: means `[dim]`.
    sigma1, sigma2: covariances `[dim, dim]` (symmetric PSD, may be singular).

  Returns:
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2
                         - 2 (sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2}),
    a python float, computed in float64.
  """
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,):
    raise ValueError(f"means must both be [dim]; got {mu1.shape}, {mu2.shape}")
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"covariances must be [{d}, {d}]; got {sigma1.shape}, "
                     f"{sigma2.shape}")
  with jax.enable_x64(True):
    value = _frechet_from_stats(*(jnp.asarray(a, jnp.float64)
                                  for a in (mu1, sigma1, mu2, sigma2)))
    # Round-off can give -1e-12 for identical sets; a distance is >= 0.
    return max(float(value), 0.0)


def frechet_distance(features1, features2) -> float:
  """Fréchet distance between Gaussian fits of `[n1, dim]` and `[n2, dim]`."""
  x = check_features("features1", features1, min_samples=2)
  y = check_features("features2", features2, min_samples=2)
  check_same_dim(x, y)
  return frechet_distance_from_stats(*gaussian_fit(x), *gaussian_fit(y))


def _poly_kernel(a, b):
  return (a @ b.T / a.shape[1] + 1.0) ** 3


@jax.jit
def _mmd2_unbiased(x, y):
  m = x.shape[0]
  kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
  off = 1.0 / (m * (m - 1))
  return (off * (kxx.sum() - jnp.trace(kxx)) + off * (kyy.sum() - jnp.trace(kyy))
          - 2.0 * kxy.mean())


def kernel_inception_distance(features1, features2, *, num_subsets: int = 100,
                              subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """KID: unbiased MMD^2 with kernel k(x, y) = (x.y / dim + 1)^3.

  As in Binkowski et al. 2018: draw `num_subsets` random subsets of `m`
  samples (without replacement within a subset) from each set, compute the
  unbiased MMD^2 on each, and report the mean and std over subsets. `m` is
  `subset_size` capped at half the smaller set, so both sets vary between
  subsets and the std reflects both samples' variability at `m` per set.

  Args:
    features1: `[n1, dim]`, n1 >= 4.
    features2: `[n2, dim]`, n2 >= 4.
    num_subsets: number of subset pairs.
    subset_size: samples per subset (>= 2) before the cap.
    seed: numpy seed for the subset draws (per subset: `choice(n1)` then
      `choice(n2)`, without replacement).

  Returns:
    (mean, std) of MMD^2 over subsets, python floats (unbiased: may be < 0).
  """
  x = check_features("features1", features1, min_samples=2)
  y = check_features("features2", features2, min_samples=2)
  check_same_dim(x, y)
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
  if subset_size < 2:
    raise ValueError(f"subset_size must be >= 2, got {subset_size}")
  m = min(subset_size, min(x.shape[0], y.shape[0]) // 2)
  if m < 2:
    raise ValueError(f"KID needs at least 4 samples per set (subsets of at "
                     f"most half the smaller set), got {x.shape[0]} and "
                     f"{y.shape[0]}")
  rng = np.random.default_rng(seed)
  # float64 host copies: the kernel's cube amplifies fp32 round-off.
  with jax.enable_x64(True):
    xs = jnp.asarray(x, jnp.float64)
    ys = jnp.asarray(y, jnp.float64)
    values = []
    for _ in range(num_subsets):
      ix = rng.choice(x.shape[0], m, replace=False)
      iy = rng.choice(y.shape[0], m, replace=False)
      values.append(float(_mmd2_unbiased(xs[ix], ys[iy])))
  values = np.asarray(values)
  return float(values.mean()), float(values.std())


def centred(x, centre) -> np.ndarray:
  """`x - centre` as float32 (subtracted in float64 unless `x` is float32;
  rounding the centre to float32 shifts every row alike)."""
  x = np.asarray(x)
  if x.dtype == np.float32:
    return x - np.asarray(centre, np.float32)
  return (x.astype(np.float64) - np.asarray(centre, np.float64)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("k",))
def _chunk_knn(q, ref, ref_sq, k):
  sq = (jnp.sum(q * q, axis=1, keepdims=True) + ref_sq[None, :]
        - 2.0 * jnp.matmul(q, ref.T, precision=jax.lax.Precision.HIGHEST))
  _, idx = jax.lax.top_k(-sq, k)
  # The found neighbours' distances from differences: exact 0 for copies.
  d = jnp.sqrt(jnp.sum((q[:, None, :] - ref[idx]) ** 2, axis=-1))
  order = jnp.argsort(d, axis=1)
  return (jnp.take_along_axis(d, order, axis=1),
          jnp.take_along_axis(idx, order, axis=1))


def nearest_neighbors(queries, reference, *, k: int = 1,
                      chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """The k nearest reference rows (Euclidean) of every query row, chunked.

  Memory is `O(chunk_size * num_reference)`, so 10k x 10k sets are fine.
  Both sets are centred on the reference mean first, so a large common
  offset does not cancel in the float32 `|q|^2 + |r|^2 - 2 q.r`.

  Args:
    queries: `[num_queries, dim]`.
    reference: `[num_reference, dim]`.
    k: neighbours per query (<= num_reference).
    chunk_size: queries per jitted block; the last block is padded so only
      one shape is compiled.

  Returns:
    distances `[num_queries, k]` ascending (float32) and indices
    `[num_queries, k]` (int) into `reference`.
  """
  q = check_features("queries", queries)
  ref = check_features("reference", reference)
  check_same_dim(q, ref)
  mean = ref.mean(axis=0, dtype=np.float64)
  q, ref = centred(q, mean), centred(ref, mean)
  if not 1 <= k <= ref.shape[0]:
    raise ValueError(f"k must be in [1, {ref.shape[0]}] (reference size), got {k}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  n = q.shape[0]
  chunk = min(chunk_size, n)
  ref_j = jnp.asarray(ref)
  ref_sq = jnp.sum(ref_j * ref_j, axis=1)
  dists, idxs = [], []
  for start in range(0, n, chunk):
    block = q[start:start + chunk]
    pad = chunk - block.shape[0]
    block = np.pad(block, ((0, pad), (0, 0)))
    d, i = _chunk_knn(jnp.asarray(block), ref_j, ref_sq, k)
    dists.append(np.asarray(d)[:chunk - pad])
    idxs.append(np.asarray(i)[:chunk - pad])
  return np.concatenate(dists), np.concatenate(idxs)


def pairwise_distances(x, y) -> np.ndarray:
  """Euclidean distances `[n, m]` between `[n, dim]` and `[m, dim]` (small
  sets), computed after centring both on the mean of `y`."""
  x = check_features("x", x)
  y = check_features("y", y)
  check_same_dim(x, y)
  mean = y.mean(axis=0, dtype=np.float64)
  x, y = centred(x, mean), centred(y, mean)
  sq = ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :]
        - 2.0 * np.asarray(jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)))
  return np.sqrt(np.clip(sq, 0.0, None))
