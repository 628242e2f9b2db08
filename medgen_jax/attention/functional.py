"""Attention as pure functions over arrays: full, chunked, axial and windowed.

Every function takes q/k/v laid out channels last with heads before head-dim,
`[batch, *spatial, heads, head_dim]`, and scales scores by `1/sqrt(head_dim)`
exactly as `jax.nn.dot_product_attention` does. Softmax statistics are always
accumulated in float32, whatever the input dtype.

Conventions for `bias` / `mask` (those of `jax.nn.dot_product_attention`):
bias is added to the scaled logits and must broadcast to
`[batch, heads, q_len, kv_len]`; mask is boolean, True where a query may attend
to a key, and masked logits are replaced by a large negative number (so a fully
masked row averages all values, as in JAX).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
IntOrSeq = int | Sequence[int]

# The value JAX uses for masked logits: finite, so fully masked rows stay NaN-free.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _check_qkv(q: Array, k: Array, v: Array, *, min_rank: int, name: str) -> None:
  if q.ndim < min_rank or k.ndim != q.ndim or v.ndim != q.ndim:
    raise ValueError(
        f"{name}: q/k/v must have the same rank >= {min_rank} "
        f"([batch, ..., heads, head_dim]); got shapes {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"{name}: k and v shapes differ: {k.shape} vs {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[-2:] != k.shape[-2:]:
    raise ValueError(
        f"{name}: q {q.shape} and k {k.shape} must agree on batch, heads and head_dim")


def _as_4d(x: Array | None, target: tuple[int, int, int, int], what: str) -> Array | None:
  """Left-pads `x` to rank 4 and checks it broadcasts to `target` [B, h, N, M]."""
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.ndim > 4:
    raise ValueError(f"{what} must have rank <= 4 (broadcastable to "
                     f"[batch, heads, q_len, kv_len] = {target}); got shape {x.shape}")
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  for have, want in zip(x.shape, target):
    if have not in (1, want):
      raise ValueError(f"{what} of shape {x.shape} does not broadcast to "
                       f"[batch, heads, q_len, kv_len] = {target}")
  return x


# On CPU the blocked form beats XLA's dense attention (which writes the whole
# [B, h, N, M] score tensor several times) from about 512 x 512 scores on:
# measured 1.5x at 512, 2.2x at 1024 and 2x-3x at 2048 tokens (B=4, 4 heads,
# head_dim 32, fwd+bwd); see docs/benchmarks.md.
_CPU_CHUNKED_MIN_SCORES = 512 * 512
# Default block: about 2^18 float32 scores per (B, h, bq, bk) block (1 MiB), so
# a block and its exp stay in L2; measured 128 x 128 at B * h = 16 beats 256+.
_CPU_BLOCK_SCORES = 2 ** 18
IMPLEMENTATIONS = ("xla", "chunked")


def default_chunk_size(batch_heads: int, q_len: int, kv_len: int,
                       backend: str | None = None) -> int | None:
  """Block size `full_attention` uses when chunk_size is None (None = XLA path).

  Args:
    batch_heads: batch * heads, the number of independent attention maps.
    q_len, kv_len: sequence lengths.
    backend: a jax backend name; None is the default backend.

  Returns:
    A power-of-two block in [64, 512] on CPU for q_len * kv_len >= 512 * 512,
    else None (GPU/TPU keep `jax.nn.dot_product_attention`, i.e. cuDNN/XLA).
  """
  backend = backend or jax.default_backend()
  if backend != "cpu" or q_len * kv_len < _CPU_CHUNKED_MIN_SCORES:
    return None
  side = math.sqrt(_CPU_BLOCK_SCORES / max(batch_heads, 1))
  return int(min(512, max(64, 2 ** round(math.log2(side)))))


def full_attention(q: Array, k: Array, v: Array, *, bias: Array | None = None,
                   mask: Array | None = None,
                   chunk_size: IntOrSeq | None = None,
                   implementation: str | None = None) -> Array:
  """Softmax attention of every query over every key.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, heads, head_dim]` (kv_len != q_len is cross-attention).
    v: `[batch, kv_len, heads, head_dim]`.
    bias: added to the scaled logits, broadcastable to `[batch, heads, q_len, kv_len]`.
    mask: bool, broadcastable to `[batch, heads, q_len, kv_len]`; True = may attend.
    chunk_size: an int (or a `(query_block, key_block)` pair) runs the exact
      memory-efficient version: online softmax over key blocks inside a loop
      over query blocks, with a flash-attention backward that recomputes
      blocks, so forward and backward memory grow linearly with the sequence
      length. None picks by backend (`default_chunk_size`): on CPU the chunked
      form for q_len * kv_len >= 512 * 512, where it is faster, with blocks of
      ~1 MiB of scores; otherwise `jax.nn.dot_product_attention` (cuDNN on GPU).
    implementation: None (choose as above), 'xla' (always
      `jax.nn.dot_product_attention`, ignoring chunk_size) or 'chunked' (the
      blocked form, with the default block when chunk_size is None).

  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype.
  """
  _check_qkv(q, k, v, min_rank=4, name="full_attention")
  if q.ndim != 4:
    raise ValueError(f"full_attention expects [batch, tokens, heads, head_dim]; "
                     f"got q of shape {q.shape}")
  b, n, h, _ = q.shape
  m = k.shape[1]
  bias = _as_4d(bias, (b, h, n, m), "bias")
  mask = _as_4d(mask, (b, h, n, m), "mask")
  if mask is not None:
    mask = mask.astype(bool)
  if implementation not in (None,) + IMPLEMENTATIONS:
    raise ValueError(f"full_attention: implementation must be None or one of "
                     f"{IMPLEMENTATIONS}; got {implementation!r}")
  if implementation == "xla":
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
  if chunk_size is None:
    chunk_size = default_chunk_size(b * h, n, m)
    if chunk_size is None and implementation == "chunked":
      chunk_size = default_chunk_size(b * h, n, m, backend="cpu") or 128
  if chunk_size is None:
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
  q_chunk, k_chunk = ((chunk_size, chunk_size) if isinstance(chunk_size, int)
                      else tuple(chunk_size))
  if q_chunk < 1 or k_chunk < 1:
    raise ValueError(f"chunk_size must be positive; got {chunk_size}")
  return _chunked_attention(q, k, v, bias, mask, q_chunk, k_chunk)


def attention_weights(q: Array, k: Array, *, bias: Array | None = None,
                      mask: Array | None = None) -> Array:
  """Softmax attention probabilities, for attention maps and tests.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, heads, head_dim]`.
    bias, mask: as in `full_attention`.

  Returns:
    float32 `[batch, heads, q_len, kv_len]`, rows summing to 1.
  """
  if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention_weights expects q [B, N, h, d] and k [B, M, h, d]; "
                     f"got {q.shape} and {k.shape}")
  b, n, h, d = q.shape
  bias = _as_4d(bias, (b, h, n, k.shape[1]), "bias")
  mask = _as_4d(mask, (b, h, n, k.shape[1]), "mask")
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / math.sqrt(d))
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask.astype(bool), logits, _MASK_VALUE)
  return jax.nn.softmax(logits, axis=-1)


# ---------------------------------------------------------------------------
# Chunked (flash-style) exact attention.
# ---------------------------------------------------------------------------


def _block_size(length: int, chunk: int) -> int:
  """Equal blocks of at most `chunk`, so padding is under one row per block."""
  num_blocks = -(-length // chunk)
  return -(-length // num_blocks)


def _pad_axis(x: Array, axis: int, size: int, value) -> Array:
  if x.shape[axis] == size or x.shape[axis] == 1:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads, constant_values=value)


def _chunked_attention(q, k, v, bias, mask, q_chunk, k_chunk):
  b, n, h, d = q.shape
  m = k.shape[1]
  bq, bk = _block_size(n, q_chunk), _block_size(m, k_chunk)
  n_pad, m_pad = -(-n // bq) * bq, -(-m // bk) * bk
  scale = 1.0 / math.sqrt(d)
  # [B, h, N, d] makes every block product one batched matmul over (B, h).
  # q is scaled once here rather than every [bq, bk] logit block.
  qt = _pad_axis((q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3), 2, n_pad, 0)
  kt = _pad_axis(k.transpose(0, 2, 1, 3), 2, m_pad, 0)
  vt = _pad_axis(v.transpose(0, 2, 1, 3), 2, m_pad, 0)
  if bias is not None:
    bias = _pad_axis(_pad_axis(bias, 2, n_pad, 0), 3, m_pad, 0)
  if mask is not None:
    mask = _pad_axis(_pad_axis(mask, 2, n_pad, True), 3, m_pad, True)
  cfg = _FlashConfig(bq=bq, bk=bk, kv_len=m, scale=scale)
  out = _flash(cfg, qt, kt, vt, bias, mask)
  return out[:, :, :n].transpose(0, 2, 1, 3)


class _FlashConfig:
  """Static block configuration (hashable, so it can be a nondiff argument)."""

  def __init__(self, *, bq: int, bk: int, kv_len: int, scale: float):
    self.bq, self.bk, self.kv_len, self.scale = bq, bk, kv_len, scale

  def _key(self):
    return (self.bq, self.bk, self.kv_len, self.scale)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, _FlashConfig) and self._key() == other._key()


def _full(shape, fill: float, *like) -> Array:
  """float32 loop-carry init, varying over the same shard_map axes as `like`.

  Inside `shard_map` a scan carry must keep its varying-axes type; a constant
  init would not match the per-shard values the loop body produces.
  """
  out = jnp.full(shape, fill, jnp.float32)
  for x in like:
    if x is not None:  # full_like takes on x's varying axes; XLA folds the zeros away
      out = out + lax.full_like(x, 0, jnp.float32, shape)
  return out


def _slice(x: Array, axis: int, start, size: int) -> Array:
  """Block of `x` along `axis`, or all of it where the axis is broadcast (size 1)."""
  if x.shape[axis] == 1:
    return x
  return lax.dynamic_slice_in_dim(x, start, size, axis)


def _rows(x: Array, i, size: int) -> Array:
  """Rows [i * size, (i + 1) * size) of axis 2; the whole array if there is one block."""
  if x.shape[2] == size:
    return x
  return lax.dynamic_slice_in_dim(x, i * size, size, 2)


def _mm(x: Array, y: Array, contract: tuple[int, int]) -> Array:
  """float32 batched matmul over the leading (batch, heads) axes of 4D x and y."""
  return lax.dot_general(x, y, (((contract[0],), (contract[1],)), ((0, 1), (0, 1))),
                         preferred_element_type=jnp.float32)


def _block_logits(cfg: _FlashConfig, qi, kj, bias, mask, i, j):
  """Biased, masked float32 logits of (pre-scaled) query block i vs key block j."""
  s = _mm(qi, kj, (3, 3))  # [B, h, bq, bk]
  if bias is not None:
    s = s + _slice(_slice(bias, 2, i * cfg.bq, cfg.bq), 3, j * cfg.bk, cfg.bk).astype(jnp.float32)
  if mask is not None:
    mask_ij = _slice(_slice(mask, 2, i * cfg.bq, cfg.bq), 3, j * cfg.bk, cfg.bk)
    s = jnp.where(mask_ij, s, _MASK_VALUE)
  else:
    mask_ij = None
  if cfg.kv_len % cfg.bk:
    # Padded keys must vanish even from fully masked rows, hence -inf, not _MASK_VALUE.
    key_idx = j * cfg.bk + jnp.arange(cfg.bk)
    s = jnp.where(key_idx < cfg.kv_len, s, -jnp.inf)
  return s, mask_ij


def _flash_forward(cfg: _FlashConfig, q, k, v, bias, mask):
  """Returns out `[B, h, N, d]` (q dtype) and the row max and 1/row-sum `[B, h, N]`.

  `q` is already scaled by 1/sqrt(d). The softmax statistics stay split (not
  one logsumexp) because a fully masked row has max = _MASK_VALUE, and adding
  log(row_sum) to it rounds away.
  """
  b, h, n, d = q.shape
  m = k.shape[2]
  nq, nk = n // cfg.bq, m // cfg.bk
  like = (q, k, v, bias, mask)

  def query_block(_, i):
    qi = _rows(q, i, cfg.bq)

    def key_step(carry, j):
      row_max, row_sum, acc = carry
      s, _ = _block_logits(cfg, qi, _rows(k, j, cfg.bk), bias, mask, i, j)
      new_max = jnp.maximum(row_max, s.max(axis=-1))
      p = jnp.exp(s - new_max[..., None])
      correction = jnp.exp(row_max - new_max)
      row_sum = correction * row_sum + p.sum(axis=-1)
      acc = correction[..., None] * acc + _mm(p.astype(v.dtype), _rows(v, j, cfg.bk), (3, 2))
      return (new_max, row_sum, acc), None

    init = (_full((b, h, cfg.bq), -jnp.inf, *like), _full((b, h, cfg.bq), 0.0, *like),
            _full((b, h, cfg.bq, d), 0.0, *like))
    (row_max, row_sum, acc), _ = lax.scan(key_step, init, jnp.arange(nk))
    inv_sum = 1.0 / row_sum
    return None, ((acc * inv_sum[..., None]).astype(q.dtype), row_max, inv_sum)

  _, (out, row_max, inv_sum) = lax.scan(query_block, None, jnp.arange(nq))
  out = jnp.moveaxis(out, 0, 2).reshape(b, h, n, d)  # [nq, B, h, bq, d] -> [B, h, N, d]
  stats = tuple(jnp.moveaxis(x, 0, 2).reshape(b, h, n) for x in (row_max, inv_sum))
  return out, stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, bias, mask):
  return _flash_forward(cfg, q, k, v, bias, mask)[0]


def _flash_fwd(cfg, q, k, v, bias, mask):
  out, stats = _flash_forward(cfg, q, k, v, bias, mask)
  return out, (q, k, v, bias, mask, out, stats)


def _flash_bwd(cfg, res, dout):
  """Flash backward: recompute each block's probabilities from the row statistics.

  The loop runs over query blocks outside and key blocks inside, so dq of a
  query block is a loop-local accumulator, while dk/dv (and dbias) accumulate
  into full-size carries. With p = e * inv_sum (e = exp(s - row_max)), the
  1/row-sum is folded into the [bq, d] rows of dout and into delta instead of
  every [bq, bk] block:
    dv = e^T (dout * inv),  ds = e * ((dout * inv) v^T - delta * inv).
  """
  q, k, v, bias, mask, out, (row_max, inv_sum) = res
  b, h, n, d = q.shape
  m = k.shape[2]
  nq, nk = n // cfg.bq, m // cfg.bk
  like = (q, k, v, bias, mask, dout)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  dout_s = (dout.astype(jnp.float32) * inv_sum[..., None]).astype(dout.dtype)
  delta_s = delta * inv_sum

  def query_block(carry, i):
    qi, doi = _rows(q, i, cfg.bq), _rows(dout_s, i, cfg.bq)
    max_i, delta_i = _rows(row_max, i, cfg.bq), _rows(delta_s, i, cfg.bq)

    def key_step(carry, j):
      dq_i, dk, dv, dbias = carry
      kj, vj = _rows(k, j, cfg.bk), _rows(v, j, cfg.bk)
      s, mask_ij = _block_logits(cfg, qi, kj, bias, mask, i, j)
      e = jnp.exp(s - max_i[..., None])
      dv_j = _mm(e.astype(doi.dtype), doi, (2, 2))  # [B, h, bk, d]
      ds = e * (_mm(doi, vj, (3, 3)) - delta_i[..., None])
      if mask_ij is not None:
        ds = jnp.where(mask_ij, ds, 0.0)  # masked logits are constants
      if dbias is not None:
        dbias = _accumulate_bias_grad(cfg, dbias, ds, i, j)
      ds = ds.astype(q.dtype)
      dq_i = dq_i + _mm(ds, kj, (3, 2))
      dk_j = _mm(ds, qi, (2, 2))  # qi is pre-scaled, so this is already dL/dk
      dk = _add_rows(dk, dk_j, j, cfg.bk)
      dv = _add_rows(dv, dv_j, j, cfg.bk)
      return (dq_i, dk, dv, dbias), None

    dk, dv, dbias = carry
    init = (_full((b, h, cfg.bq, d), 0.0, *like), dk, dv, dbias)
    (dq_i, dk, dv, dbias), _ = lax.scan(key_step, init, jnp.arange(nk))
    return (dk, dv, dbias), dq_i

  dbias0 = None if bias is None else _full(bias.shape, 0.0, *like)
  init = (_full(k.shape, 0.0, *like), _full(v.shape, 0.0, *like), dbias0)
  (dk, dv, dbias), dq = lax.scan(query_block, init, jnp.arange(nq))
  # This is the gradient w.r.t. the pre-scaled q; autodiff of `q * scale` in
  # `_chunked_attention` applies the scale.
  dq = jnp.moveaxis(dq, 0, 2).reshape(q.shape)
  if dbias is not None:
    dbias = dbias.astype(bias.dtype)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, None)


def _add_rows(acc: Array, block: Array, j, size: int) -> Array:
  """acc[:, :, j * size:(j + 1) * size] += block (in place inside the loop)."""
  if acc.shape[2] == size:
    return acc + block
  current = lax.dynamic_slice_in_dim(acc, j * size, size, 2)
  return lax.dynamic_update_slice_in_dim(acc, current + block, j * size, 2)


def _accumulate_bias_grad(cfg: _FlashConfig, dbias: Array, ds: Array, i, j) -> Array:
  """Adds block (i, j) of dlogits into dbias, summing over its broadcast axes."""
  sum_axes = tuple(a for a in range(4) if dbias.shape[a] == 1 and ds.shape[a] != 1)
  contrib = ds.sum(axis=sum_axes, keepdims=True) if sum_axes else ds
  start = (0, 0, i * cfg.bq if dbias.shape[2] > 1 else 0,
           j * cfg.bk if dbias.shape[3] > 1 else 0)
  current = lax.dynamic_slice(dbias, start, contrib.shape)
  return lax.dynamic_update_slice(dbias, current + contrib, start)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------
# Axial and windowed attention: re-layouts around `full_attention`.
# ---------------------------------------------------------------------------


def _num_spatial(q: Array, name: str) -> int:
  num = q.ndim - 3
  if num not in (2, 3):
    raise ValueError(f"{name} expects 2 or 3 spatial dims, [batch, H, W, heads, head_dim] "
                     f"or [batch, D, H, W, heads, head_dim]; got shape {q.shape}")
  return num


def axial_attention(q: Array, k: Array, v: Array, *, axis: int,
                    chunk_size: IntOrSeq | None = None) -> Array:
  """Attention along one spatial axis; every other position is independent.

  Args:
    q, k, v: `[batch, *spatial, heads, head_dim]` with 2 or 3 spatial dims
      (k/v may differ from q in length along `axis` only).
    axis: spatial axis to attend along (0 = first spatial axis, i.e. array
      axis 1; negative counts from the last spatial axis).
    chunk_size: forwarded to `full_attention`.

  Returns:
    Same shape and dtype as q.
  """
  _check_qkv(q, k, v, min_rank=5, name="axial_attention")
  num = _num_spatial(q, "axial_attention")
  if not -num <= axis < num:
    raise ValueError(f"axial_attention: axis {axis} out of range for {num} spatial dims")
  ax = 1 + axis % num
  # Fold every other spatial axis into the batch: lines become sequences.
  def to_lines(x):
    x = jnp.moveaxis(x, ax, -3)
    return x.reshape((-1,) + x.shape[-3:]), x.shape
  ql, q_moved = to_lines(q)
  kl, _ = to_lines(k)
  vl, _ = to_lines(v)
  if ql.shape[0] != kl.shape[0]:
    raise ValueError(f"axial_attention: q {q.shape} and k {k.shape} may differ only along "
                     f"spatial axis {axis}")
  out = full_attention(ql, kl, vl, chunk_size=chunk_size)
  return jnp.moveaxis(out.reshape(q_moved), -3, ax)


def _per_axis(value: IntOrSeq, num: int, what: str) -> tuple[int, ...]:
  if isinstance(value, (int, np.integer)):
    return (int(value),) * num
  value = tuple(int(x) for x in value)
  if len(value) != num:
    raise ValueError(f"{what} {value} needs one entry per spatial axis ({num})")
  return value


def window_partition(x: Array, window: Sequence[int]) -> Array:
  """`[B, *spatial, ...]` -> `[B * num_windows, prod(window), ...]` (row-major windows)."""
  num = len(window)
  b, spatial, rest = x.shape[0], x.shape[1:1 + num], x.shape[1 + num:]
  split = [b]
  for size, w in zip(spatial, window):
    split += [size // w, w]
  x = x.reshape(split + list(rest))
  grid_axes = [1 + 2 * a for a in range(num)]
  local_axes = [2 + 2 * a for a in range(num)]
  tail = list(range(1 + 2 * num, x.ndim))
  x = x.transpose([0] + grid_axes + local_axes + tail)
  return x.reshape((-1, math.prod(window)) + rest)


def window_reverse(x: Array, window: Sequence[int], spatial: Sequence[int]) -> Array:
  """Inverse of `window_partition`: `[B * num_windows, prod(window), ...]` -> `[B, *spatial, ...]`."""
  num = len(window)
  rest = x.shape[2:]
  grid = [s // w for s, w in zip(spatial, window)]
  x = x.reshape([-1] + grid + list(window) + list(rest))
  order = [0]
  for a in range(num):
    order += [1 + a, 1 + num + a]
  order += list(range(1 + 2 * num, x.ndim))
  x = x.transpose(order)
  return x.reshape((x.shape[0],) + tuple(spatial) + rest)


def shifted_window_mask(spatial: Sequence[int], window: Sequence[int],
                        shift: Sequence[int]) -> np.ndarray:
  """Swin region mask `[num_windows, T, T]` (True = may attend) for a rolled grid.

  After rolling by -shift, the last window along an axis holds tokens from both
  sides of the border the roll created; tokens only attend within their region.
  """
  region = np.zeros(tuple(spatial), np.int32)
  for a, (size, w, s) in enumerate(zip(spatial, window, shift)):
    bounds = [0, size - w, size - s, size] if s else [0, size]
    ids = np.zeros(size, np.int32)
    for r, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
      ids[lo:hi] = r
    # Mixed radix so every combination of per-axis regions gets its own id.
    region = region * 3 + ids.reshape([-1 if i == a else 1 for i in range(len(spatial))])
  windows = np.asarray(window_partition(region[None], window))  # [nW, T]
  return windows[:, :, None] == windows[:, None, :]


def window_attention(q: Array, k: Array, v: Array, *, window_size: IntOrSeq,
                     shift: IntOrSeq = 0, bias: Array | None = None) -> Array:
  """Swin-style attention inside non-overlapping windows, optionally shifted.

  Args:
    q, k, v: `[batch, H, W, heads, head_dim]` or `[batch, D, H, W, heads, head_dim]`.
    window_size: int or one size per spatial axis; must divide the spatial sizes.
    shift: int or per-axis cyclic shift (0 <= shift < window). With shift > 0 the
      grid is rolled by -shift, attention runs per window under the Swin region
      mask (no token attends across the border the roll created), and the
      result is rolled back.
    bias: `[heads, T, T]` with T = prod(window) (e.g. `RelativePositionBias`),
      added to every window's logits.

  Returns:
    Same shape and dtype as q.
  """
  _check_qkv(q, k, v, min_rank=5, name="window_attention")
  num = _num_spatial(q, "window_attention")
  if q.shape != k.shape:
    raise ValueError(f"window_attention is self-attention: q {q.shape} != k {k.shape}")
  spatial = q.shape[1:1 + num]
  window = _per_axis(window_size, num, "window_size")
  shifts = _per_axis(shift, num, "shift")
  for size, w in zip(spatial, window):
    if w < 1 or size % w:
      raise ValueError(f"window_attention: spatial size {tuple(spatial)} is not divisible "
                       f"by window_size {window}")
  for w, s in zip(window, shifts):
    if not 0 <= s < w:
      raise ValueError(f"window_attention: shift {shifts} must satisfy 0 <= shift < "
                       f"window_size {window}")
  tokens = math.prod(window)
  heads = q.shape[-2]
  if bias is not None and bias.shape != (heads, tokens, tokens):
    raise ValueError(f"window_attention: bias must be [heads, T, T] = "
                     f"{(heads, tokens, tokens)}; got {bias.shape}")
  axes = tuple(range(1, 1 + num))
  shifted = any(shifts)
  if shifted:
    q, k, v = (jnp.roll(x, [-s for s in shifts], axis=axes) for x in (q, k, v))
  qw, kw, vw = (window_partition(x, window) for x in (q, k, v))
  mask = None
  if shifted:
    region = shifted_window_mask(spatial, window, shifts)  # [nW, T, T]
    mask = jnp.asarray(np.tile(region, (q.shape[0], 1, 1))[:, None])
  out = full_attention(qw, kw, vw, bias=None if bias is None else bias[None], mask=mask)
  out = window_reverse(out, window, spatial)
  if shifted:
    out = jnp.roll(out, list(shifts), axis=axes)
  return out


def _spatial_full(q, k, v, *, window_size=None, shift=None, bias=None, chunk_size=None):
  del window_size, shift
  b, heads, dim = q.shape[0], q.shape[-2], q.shape[-1]
  flat = lambda x: x.reshape(b, -1, heads, dim)
  return full_attention(flat(q), flat(k), flat(v), bias=bias,
                        chunk_size=chunk_size).reshape(q.shape)


def _spatial_axial(q, k, v, *, window_size=None, shift=None, bias=None, chunk_size=None):
  del window_size, shift
  if bias is not None:
    raise ValueError("axial attention takes no bias")
  num = _num_spatial(q, "axial attention")
  outs = [axial_attention(q, k, v, axis=a, chunk_size=chunk_size) for a in range(num)]
  return sum(outs[1:], outs[0])


def _spatial_window(shifted: bool) -> Callable[..., Array]:
  def attend(q, k, v, *, window_size=8, shift=None, bias=None, chunk_size=None):
    del chunk_size  # windows are small; blocking them buys nothing
    if shift is None:
      window = _per_axis(window_size, _num_spatial(q, "window attention"), "window_size")
      shift = tuple(w // 2 for w in window) if shifted else 0
    return window_attention(q, k, v, window_size=window_size, shift=shift, bias=bias)
  return attend


# Registry of variants with one signature over `[batch, *spatial, heads, head_dim]`:
# `fn(q, k, v, *, window_size=, shift=None, bias=None, chunk_size=None)`.
# 'full' flattens the spatial axes; 'axial' sums attention along every spatial
# axis (each token sees its row, column and, in 3D, depth line in one call);
# 'window_shifted' defaults to shift = window // 2.
ATTENTION_VARIANTS: dict[str, Callable[..., Array]] = {
    "full": _spatial_full,
    "axial": _spatial_axial,
    "window": _spatial_window(shifted=False),
    "window_shifted": _spatial_window(shifted=True),
}
