"""Attention as pure functions over arrays: dispatch, axial and windowed layouts.

Every function takes q/k/v laid out channels last with heads before head-dim,
`[batch, *spatial, heads, head_dim]`, and scales scores by `1/sqrt(head_dim)`
exactly as `jax.nn.dot_product_attention` does. Softmax statistics are always
accumulated in float32, whatever the input dtype.

`full_attention` chooses per backend between cuDNN / Pallas flash kernels
(`medgen_jax.attention.kernels`), XLA's dense attention and the blocked exact
kernel of `medgen_jax.attention.chunked`; `axial_attention` and
`window_attention` re-lay tokens out (lines, windows) and call it. The named
variants the layers use are in `medgen_jax.attention.registry`.

Conventions for `bias` / `mask` (those of `jax.nn.dot_product_attention`):
bias is added to the scaled logits and must broadcast to
`[batch, heads, q_len, kv_len]`; mask is boolean, True where a query may attend
to a key, and masked logits are replaced by a large negative number (so a fully
masked row averages all values, as in JAX).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medgen_jax.attention import kernels
from medgen_jax.attention.chunked import MASK_VALUE, chunked_attention
from medgen_jax.attention.kernels import IMPLEMENTATIONS

Array = jax.Array
IntOrSeq = int | Sequence[int]

SCORES_DIMS = "[batch, heads, q_len, kv_len]"


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


def _as_4d(x: Array | None, target: tuple[int, int, int, int], what: str,
           dims: str = SCORES_DIMS) -> Array | None:
  """Left-pads `x` to rank 4 and checks it broadcasts to `target`.

  Args:
    x: a bias or mask, or None.
    target: the score shape, e.g. `(batch, heads, q_len, kv_len)`.
    what: how error messages name `x`, e.g. 'bias' or 'ring_attention: bias'.
    dims: how error messages name the axes of `target`.

  Returns:
    None or `x` reshaped to rank 4.
  """
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.ndim > 4:
    raise ValueError(f"{what} must have rank <= 4 (broadcastable to "
                     f"{dims} = {target}); got shape {x.shape}")
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  for have, want in zip(x.shape, target):
    if have not in (1, want):
      raise ValueError(f"{what} of shape {x.shape} does not broadcast to "
                       f"{dims} = {target}")
  return x


def full_attention(q: Array, k: Array, v: Array, *, bias: Array | None = None,
                   mask: Array | None = None,
                   chunk_size: IntOrSeq | None = None,
                   implementation: str | None = None) -> Array:
  """Softmax attention of every query over every key, by the fastest exact kernel.

  What runs with `implementation=None` and `chunk_size=None`
  (`kernels.choose_implementation`, a pure function of backend, dtype, shapes
  and bias / mask presence):

  * GPU: 'cudnn' (cuDNN flash attention) when there is no bias and no mask,
    q/k/v are bf16 or fp16 and head_dim is a multiple of 8 up to 128.
    Otherwise (float32, a bias such as the relative position bias, or the
    Swin mask) 'xla' up to 2^28 batch * heads * q_len * kv_len scores, and
    'chunked' above that, so memory stays linear in the sequence length.
  * TPU: 'pallas_tpu' (Pallas TPU flash attention) when there is no bias and
    no mask, q_len and kv_len are multiples of 128 and head_dim <= 128 or a
    multiple of 128; otherwise 'xla' / 'chunked' as on GPU.
  * CPU: 'xla' below q_len * kv_len = 512 * 512, 'chunked' from there (with
    `kernels.cpu_chunk_size` blocks: ~2^21 scores per loop, 128-key blocks
    and long query blocks), bias and mask or not.

  The implementations (each forced by `implementation=`):

  * 'chunked' (`medgen_jax.attention.chunked`): exact online softmax over key
    blocks inside a loop over query blocks, with a backward pass that
    recomputes blocks: memory linear in the sequence length. Plain XLA loops
    (not a fused kernel), on every backend, with any bias and mask; on CPU
    the batch (or heads) is split into one independent loop per core
    (`kernels.cpu_groups`).
  * 'xla': `jax.nn.dot_product_attention(..., implementation='xla')`, XLA's
    dense attention: it materialises the float32 `[batch, heads, q_len,
    kv_len]` scores (quadratic memory). Any bias and mask.
  * 'cudnn': `jax.nn.dot_product_attention(..., implementation='cudnn')`; GPU
    only (jax raises elsewhere), bf16/fp16 only. A bias is cast to q's dtype
    and jax folds a mask into it, so bias gradients come back in q's dtype.
  * 'pallas_tpu' (`kernels.pallas_tpu_attention`): lengths multiples of 128.
    It takes no broadcast bias and no boolean mask, so when forced with
    either they are materialised as one dense float32 bias (quadratic).
  * 'pallas_gpu' (`kernels.pallas_gpu_attention`, Triton): no bias, no mask
    (forcing it with either is an error); q_len == kv_len in practice.

  Forcing a Pallas kernel on a backend it was not written for runs it in
  Pallas' interpreter: exact but orders of magnitude slower (tests only).

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, heads, head_dim]` (kv_len != q_len is cross-attention).
    v: `[batch, kv_len, heads, head_dim]`.
    bias: added to the scaled logits, broadcastable to `[batch, heads, q_len, kv_len]`.
    mask: bool, broadcastable to `[batch, heads, q_len, kv_len]`; True = may attend.
    chunk_size: an int (or a `(query_block, key_block)` pair) runs 'chunked'
      with blocks of at most that size, on any backend (unless another
      implementation is forced); None chooses as above.
    implementation: None (choose as above) or one of `kernels.IMPLEMENTATIONS`
      ('xla', 'chunked', 'cudnn', 'pallas_tpu', 'pallas_gpu'). 'chunked' with
      chunk_size None uses the backend's default block.

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
  backend = jax.default_backend()
  if implementation is None and chunk_size is not None:
    implementation = "chunked"
  if implementation is None:
    choice = kernels.choose_implementation(
        backend, q.dtype, q.shape, k.shape, has_bias=bias is not None,
        has_mask=mask is not None)
    implementation, chunk_size = choice.implementation, choice.chunk_size
  if implementation == "xla":
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                        implementation="xla")
  if implementation == "cudnn":
    return kernels.cudnn_attention(q, k, v, bias, mask)
  if implementation == "pallas_tpu":
    return kernels.pallas_tpu_attention(q, k, v, bias, mask,
                                        interpret=backend != "tpu")
  if implementation == "pallas_gpu":
    if bias is not None or mask is not None:
      raise ValueError("full_attention: implementation='pallas_gpu' takes no bias "
                       "or mask; use 'chunked', 'xla' or 'cudnn'")
    return kernels.pallas_gpu_attention(q, k, v, interpret=backend != "gpu")
  if chunk_size is None:
    chunk_size = kernels.default_blocks(backend, b, h, n, m)
  q_chunk, k_chunk = ((chunk_size, chunk_size) if isinstance(chunk_size, int)
                      else tuple(chunk_size))
  if q_chunk < 1 or k_chunk < 1:
    raise ValueError(f"chunk_size must be positive; got {chunk_size}")
  groups = kernels.cpu_groups(b, h) if backend == "cpu" else 1
  return chunked_attention(q, k, v, bias, mask, q_chunk, k_chunk, groups=groups)


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
    logits = jnp.where(mask.astype(bool), logits, MASK_VALUE)
  return jax.nn.softmax(logits, axis=-1)


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
                    chunk_size: IntOrSeq | None = None,
                    implementation: str | None = None) -> Array:
  """Attention along one spatial axis; every other position is independent.

  Every line along `axis` becomes one sequence of a `full_attention` call
  (lines folded into the batch), so the kernel is `full_attention`'s choice
  (`kernels.choose_implementation`): e.g. cuDNN flash attention on GPU for
  bf16/fp16, XLA's dense attention for lines shorter than 512 on CPU.

  Args:
    q, k, v: `[batch, *spatial, heads, head_dim]` with 2 or 3 spatial dims
      (k/v may differ from q in length along `axis` only).
    axis: spatial axis to attend along (0 = first spatial axis, i.e. array
      axis 1; negative counts from the last spatial axis).
    chunk_size, implementation: forwarded to `full_attention` (None: its
      default choice).

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
  out = full_attention(ql, kl, vl, chunk_size=chunk_size, implementation=implementation)
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
                     shift: IntOrSeq = 0, bias: Array | None = None,
                     implementation: str | None = None) -> Array:
  """Swin-style attention inside non-overlapping windows, optionally shifted.

  The windows become the sequences of one `full_attention` call (windows
  folded into the batch), so the kernel is `full_attention`'s choice
  (`kernels.choose_implementation`): without bias and shift (no mask) e.g.
  cuDNN flash attention on GPU for bf16/fp16; with the relative position bias
  or the Swin mask XLA's dense attention (windows are short, so the scores
  stay small).

  Args:
    q, k, v: `[batch, H, W, heads, head_dim]` or `[batch, D, H, W, heads, head_dim]`.
    window_size: int or one size per spatial axis; must divide the spatial sizes.
    shift: int or per-axis cyclic shift (0 <= shift < window). With shift > 0 the
      grid is rolled by -shift, attention runs per window under the Swin region
      mask (no token attends across the border the roll created), and the
      result is rolled back.
    bias: `[heads, T, T]` with T = prod(window) (e.g. `RelativePositionBias`),
      added to every window's logits.
    implementation: forwarded to `full_attention` (None: its default choice).

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
  out = full_attention(qw, kw, vw, bias=None if bias is None else bias[None], mask=mask,
                       implementation=implementation)
  out = window_reverse(out, window, spatial)
  if shifted:
    out = jnp.roll(out, list(shifts), axis=axes)
  return out


def half_window_shift(window: Sequence[int], spatial: Sequence[int]) -> tuple[int, ...]:
  """Swin's shift: window // 2 per axis, but 0 along an axis the window covers whole.

  A window as long as its axis has no neighbour along that axis to exchange
  tokens with, so a shift there would only cut the window in two at the roll
  border (see `shifted_window_mask`) and take context away.
  """
  return tuple(w // 2 if w < size else 0 for w, size in zip(window, spatial))
