"""Sequence (context) parallel attention with `shard_map`: ring and all-to-all.

For volumes too large for one device the token axis is sharded over a `seq`
mesh axis. Two exact schemes live here:

* `ring_attention`: full attention. Each device keeps its query shard and
  passes key/value blocks around the ring with `lax.ppermute`; after
  `P = axis_size` hops every query has seen every key. Softmax is accumulated
  online (running max, denominator and numerator in float32, with the block
  update of `medgen_jax.attention.chunked`), so no device ever holds more
  than one `[N/P, N/P]` block of logits. On GPU and TPU each hop is one fused
  Pallas flash kernel call instead (`block_kernels`), whose per-block
  log-sum-exps merge the hops; on CPU, with a bias, or where a kernel cannot
  tile the shards, it is plain XLA ops (batched matmuls and the elementwise
  online softmax). The backward pass is a custom VJP that makes a second trip
  around the ring, recomputing each block from the stored logsumexp, and
  carries dK/dV along with K/V so each ends up on the device that owns it.
* `all_to_all_axial_attention`: attention along one spatial axis. Along an axis
  that is not sharded it is purely local. Along the sharded axis one
  `lax.all_to_all` trades the sharding of that axis for a sharding of the heads
  (or of another spatial axis), local axial attention runs on complete lines,
  and a second `all_to_all` restores the layout.

`ring_attention` / `all_to_all_axial_attention` are called inside `shard_map`
on local shards; `sequence_parallel_full_attention` /
`sequence_parallel_axial_attention` wrap them for global arrays and a `Mesh`.
Inside a jitted model, `SequenceSharding` pins activations to logical axes
and provides an `attention_fn` (the registry's signature) that shard_maps a
variant's `SequenceParallelForm` (`RING`, `ALL_TO_ALL`); the trainer sets it
on the generator when the mesh has seq > 1. See docs/scaling.md for how these
map onto a pod and what they cost.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medgen_jax.attention import block_kernels, kernels
from medgen_jax.attention.chunked import (accumulate_bias_grad, batched_matmul, block,
                                          online_softmax_update)
from medgen_jax.attention.functional import _as_4d, _num_spatial, axial_attention

Array = jax.Array


# ---------------------------------------------------------------------------
# Ring attention (inside shard_map).
# ---------------------------------------------------------------------------


def _vma(x: Array) -> frozenset:
  """Mesh axes along which `x` varies inside shard_map (empty outside / unchecked)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)  # JAX 0.10: ManualAxisType(varying=...)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", frozenset()))  # earlier releases


def _match_vma(cotangent: Array, primal: Array) -> Array:
  """Makes a hand-written cotangent vary over exactly the mesh axes its primal does.

  A primal replicated over an axis (e.g. a bias shared by all data shards)
  receives a contribution from every shard: its cotangent is their sum, which
  is what autodiff's transpose of the implicit broadcast would give.
  """
  extra = tuple(sorted(_vma(cotangent) - _vma(primal), key=str))
  if extra:
    cotangent = lax.psum(cotangent, extra)
  missing = tuple(sorted(_vma(primal) - _vma(cotangent), key=str))
  if missing:
    cotangent = lax.pcast(cotangent, missing, to="varying")
  return cotangent


def _vary_like(x: Array, *others: Array) -> Array:
  """Makes `x` vary over every mesh axis that any of `others` varies over."""
  missing = frozenset().union(*map(_vma, others)) - _vma(x)
  if missing:
    x = lax.pcast(x, tuple(sorted(missing, key=str)), to="varying")
  return x


def _ring_perm(size: int) -> list[tuple[int, int]]:
  # Device i sends to i + 1, so after t hops device i holds block (i - t) % size.
  return [(i, (i + 1) % size) for i in range(size)]


def _block_logits(q, k_blk, bias, src, scale):
  """float32 logits `[B, h, Nq, Mk]` of queries `q` vs key block `src` (bias rows pre-sliced)."""
  s = batched_matmul(q, k_blk, (3, 3)) * scale
  if bias is not None:
    size = k_blk.shape[2]
    s = s + block(bias, src * size, size, axis=3).astype(jnp.float32)
  return s


def _ring_forward(axis_name, q_chunk, q, k, v, bias):
  """q/k/v `[B, h, N_local, d]` -> out `[B, h, N_local, d]` (q dtype), lse `[B, h, N_local]`.

  Per hop, queries are processed `q_chunk` rows at a time, so at most
  `[B, h, q_chunk, kv_local]` logits are live.
  """
  size = lax.axis_size(axis_name)
  idx = lax.axis_index(axis_name)
  perm = _ring_perm(size)
  scale = 1.0 / math.sqrt(q.shape[-1])
  num_chunks = q.shape[2] // q_chunk

  def attend(t, k_blk, v_blk, state):
    src = (idx - t) % size

    def chunk(i, state):
      start = i * q_chunk
      s = _block_logits(block(q, start, q_chunk), k_blk, block(bias, start, q_chunk), src, scale)
      rows = online_softmax_update(tuple(block(x, start, q_chunk) for x in state), s, v_blk)
      return tuple(lax.dynamic_update_slice_in_dim(whole, part, start, axis=2)
                   for whole, part in zip(state, rows))

    return lax.fori_loop(0, num_chunks, chunk, state)

  def hop(t, carry):
    k_blk, v_blk, state = carry
    state = attend(t, k_blk, v_blk, state)
    # The next block's transfer does not depend on this block's maths, so XLA
    # can overlap the two.
    k_blk, v_blk = lax.ppermute((k_blk, v_blk), axis_name, perm)
    return k_blk, v_blk, state

  # Derived from q (not jnp.zeros) so the carry varies over q's mesh axes.
  stats = jnp.zeros_like(q[..., 0], dtype=jnp.float32)
  state = (stats - jnp.inf, stats, jnp.zeros_like(q, dtype=jnp.float32))
  k_blk, v_blk, state = lax.fori_loop(0, size - 1, hop, (k, v, state))
  row_max, row_sum, acc = attend(size - 1, k_blk, v_blk, state)
  out = (acc / row_sum[..., None]).astype(q.dtype)
  return out, row_max + jnp.log(row_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring(axis_name, q_chunk, q, k, v, bias):
  return _ring_forward(axis_name, q_chunk, q, k, v, bias)[0]


def _ring_fwd(axis_name, q_chunk, q, k, v, bias):
  out, lse = _ring_forward(axis_name, q_chunk, q, k, v, bias)
  return out, (q, k, v, bias, out, lse)


def _ring_bwd(axis_name, q_chunk, res, dout):
  """Second trip around the ring; dK/dV travel with K/V and arrive home at the end."""
  q, k, v, bias, out, lse = res
  size = lax.axis_size(axis_name)
  idx = lax.axis_index(axis_name)
  perm = _ring_perm(size)
  scale = 1.0 / math.sqrt(q.shape[-1])
  num_chunks = q.shape[2] // q_chunk
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

  def grads(t, k_blk, v_blk, acc):
    src = (idx - t) % size

    def chunk(i, acc):
      dk_blk, dv_blk, dq, dbias = acc
      start = i * q_chunk
      qi, doi = block(q, start, q_chunk), block(dout, start, q_chunk)
      s = _block_logits(qi, k_blk, block(bias, start, q_chunk), src, scale)
      p = jnp.exp(s - block(lse, start, q_chunk)[..., None])
      dv_blk = dv_blk + batched_matmul(p.astype(doi.dtype), doi, (2, 2))
      dp = batched_matmul(doi, v_blk, (3, 3))
      ds = p * (dp - block(delta, start, q_chunk)[..., None])
      if dbias is not None:
        dbias = accumulate_bias_grad(dbias, ds, start, src * k_blk.shape[2])
      ds = ds * scale
      dq_i = block(dq, start, q_chunk) + batched_matmul(ds.astype(k_blk.dtype), k_blk, (3, 2))
      dq = lax.dynamic_update_slice_in_dim(dq, dq_i, start, axis=2)
      dk_blk = dk_blk + batched_matmul(ds.astype(qi.dtype), qi, (2, 2))
      return dk_blk, dv_blk, dq, dbias

    return lax.fori_loop(0, num_chunks, chunk, acc)

  def hop(t, carry):
    k_blk, v_blk, (dk_blk, dv_blk, dq, dbias) = carry
    dk_blk, dv_blk, dq, dbias = grads(t, k_blk, v_blk, (dk_blk, dv_blk, dq, dbias))
    k_blk, v_blk, dk_blk, dv_blk = lax.ppermute((k_blk, v_blk, dk_blk, dv_blk), axis_name, perm)
    return k_blk, v_blk, (dk_blk, dv_blk, dq, dbias)

  zeros_k = jnp.zeros_like(k, dtype=jnp.float32)
  # dbias accumulates dlogits, which vary wherever q, k or dout do (e.g. over
  # the data axis for a bias shared by all data shards).
  dbias0 = (None if bias is None
            else _vary_like(jnp.zeros_like(bias, dtype=jnp.float32), q, k, v, dout))
  acc = (zeros_k, zeros_k, jnp.zeros_like(q, dtype=jnp.float32), dbias0)
  k_blk, v_blk, acc = lax.fori_loop(0, size - 1, hop, (k, v, acc))
  dk, dv, dq, dbias = grads(size - 1, k_blk, v_blk, acc)
  # After size - 1 hops the accumulators hold the block of device idx + 1: one
  # more hop takes them home.
  dk, dv = lax.ppermute((dk, dv), axis_name, perm)
  cts = (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
  cts = tuple(_match_vma(ct, x) for ct, x in zip(cts, (q, k, v)))
  if dbias is not None:
    dbias = _match_vma(dbias.astype(bias.dtype), bias)
  return cts + (dbias,)


_ring.defvjp(_ring_fwd, _ring_bwd)


# ---------------------------------------------------------------------------
# The ring with a fused flash kernel per hop (`block_kernels`).
# ---------------------------------------------------------------------------


def _lse_rows(lse: Array, token_axis: int) -> Array:
  """lse `[B, h, N]` as a multiplier broadcasting against out in the kernel's layout."""
  return (lse.transpose(0, 2, 1) if token_axis == 1 else lse)[..., None]


def _kernel_ring_forward(axis_name, name, interpret, q, k, v):
  """Per hop one kernel call; the hops' outputs merged by their log-sum-exps.

  Returns out (q's layout and dtype) and the global lse float32 `[B, h, N_local]`.
  The kernel ring only runs under `shard_map(check_vma=False)` (see
  `ring_attention`), so its carries and cotangents need no varying-axes types.
  """
  size = lax.axis_size(axis_name)
  perm = _ring_perm(size)
  axis = block_kernels.TOKEN_AXIS[name]

  def attend(k_blk, v_blk, out, lse):
    out_t, lse_t = block_kernels.forward(name, q, k_blk, v_blk, interpret=interpret)
    new = jnp.logaddexp(lse, lse_t)
    out = (out * _lse_rows(jnp.exp(lse - new), axis)
           + out_t.astype(jnp.float32) * _lse_rows(jnp.exp(lse_t - new), axis))
    return out, new

  def hop(_, carry):
    k_blk, v_blk, out, lse = carry
    out, lse = attend(k_blk, v_blk, out, lse)
    k_blk, v_blk = lax.ppermute((k_blk, v_blk), axis_name, perm)
    return k_blk, v_blk, out, lse

  lse = jnp.full((q.shape[0], q.shape[3 - axis], q.shape[axis]), -jnp.inf, jnp.float32)
  out = jnp.zeros_like(q, dtype=jnp.float32)
  k_blk, v_blk, out, lse = lax.fori_loop(0, size - 1, hop, (k, v, out, lse))
  out, lse = attend(k_blk, v_blk, out, lse)
  return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _kernel_ring(axis_name, name, interpret, q, k, v):
  return _kernel_ring_forward(axis_name, name, interpret, q, k, v)[0]


def _kernel_ring_fwd(axis_name, name, interpret, q, k, v):
  out, lse = _kernel_ring_forward(axis_name, name, interpret, q, k, v)
  return out, (q, k, v, out, lse)


def _kernel_ring_bwd(axis_name, name, interpret, res, dout):
  """Each hop's kernel backward with the global out and lse; dK/dV travel with K/V."""
  q, k, v, out, lse = res
  perm = _ring_perm(lax.axis_size(axis_name))

  def grads(k_blk, v_blk, dk_blk, dv_blk, dq):
    dq_t, dk_t, dv_t = block_kernels.backward(name, q, k_blk, v_blk, out, lse, dout,
                                              interpret=interpret)
    f32 = lambda x: x.astype(jnp.float32)
    return dk_blk + f32(dk_t), dv_blk + f32(dv_t), dq + f32(dq_t)

  def hop(_, carry):
    k_blk, v_blk, dk_blk, dv_blk, dq = carry
    dk_blk, dv_blk, dq = grads(k_blk, v_blk, dk_blk, dv_blk, dq)
    k_blk, v_blk, dk_blk, dv_blk = lax.ppermute((k_blk, v_blk, dk_blk, dv_blk), axis_name, perm)
    return k_blk, v_blk, dk_blk, dv_blk, dq

  zeros_k = jnp.zeros_like(k, dtype=jnp.float32)
  init = (k, v, zeros_k, zeros_k, jnp.zeros_like(q, dtype=jnp.float32))
  k_blk, v_blk, dk, dv, dq = lax.fori_loop(0, lax.axis_size(axis_name) - 1, hop, init)
  dk, dv, dq = grads(k_blk, v_blk, dk, dv, dq)
  # After size - 1 hops the accumulators hold the block of device idx + 1: one
  # more hop takes them home.
  dk, dv = lax.ppermute((dk, dv), axis_name, perm)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_kernel_ring.defvjp(_kernel_ring_fwd, _kernel_ring_bwd)


RING_IMPLEMENTATIONS = ("xla",) + block_kernels.BLOCK_KERNELS


def choose_ring_implementation(backend: str, q_local: int, kv_local: int, head_dim: int, *,
                               has_bias: bool) -> str:
  """What `ring_attention` runs per hop by default: a fused kernel where one fits.

  'pallas_gpu' on GPU and 'pallas_tpu' on TPU when there is no bias and the
  kernel takes the local lengths (`block_kernels.supports`); 'xla' (batched
  matmuls and the online softmax of `chunked`) otherwise and on CPU.
  """
  kernel = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(kernels.canonical_backend(backend))
  if kernel and not has_bias and block_kernels.supports(kernel, q_local, kv_local, head_dim):
    return kernel
  return "xla"


def ring_attention(q: Array, k: Array, v: Array, *, axis_name: str,
                   bias: Array | None = None, chunk_size: int | None = None,
                   implementation: str | None = None) -> Array:
  """Exact full attention over a sequence sharded along mesh axis `axis_name`.

  Call inside `shard_map`; every argument is this device's shard. Device i
  holds the i-th contiguous slice of queries and keys. Values and gradients
  equal those of unsharded softmax attention (scale `1/sqrt(head_dim)`).

  What runs per hop (`implementation=None`, `choose_ring_implementation`):
  on GPU the Pallas Triton flash kernel, on TPU the Pallas TPU flash kernel,
  each when there is no bias and it takes the local lengths; otherwise, and
  on CPU, 'xla': batched matmuls with the online softmax, `chunk_size`
  queries at a time. The kernels' per-hop log-sum-exps merge the hops
  (`block_kernels`); their speed on a GPU / TPU has not been measured here.
  The kernels need the enclosing `shard_map` to run with `check_vma=False`
  (the wrappers below do that when they use one); under vma checking the
  default is 'xla' and a forced kernel raises.

  Args:
    q: `[batch, q_local, heads, head_dim]`.
    k: `[batch, kv_local, heads, head_dim]` (kv_local may differ from q_local).
    v: `[batch, kv_local, heads, head_dim]`.
    axis_name: the mesh axis the token dimension is sharded over.
    bias: optional, added to the scaled logits of this device's query rows
      against ALL keys: broadcastable to `[batch, heads, q_local, kv_local * P]`
      with P the size of `axis_name` (the key axis is 1 or global). Use a large
      negative bias (not -inf) to mask.
    chunk_size: queries per inner step of the 'xla' path (must divide
      q_local); None = all of them. Each hop materialises `[batch, heads,
      chunk_size, kv_local]` float32 logits, so large shards need a chunk
      (e.g. 512-2048). The fused kernels tile by themselves and ignore it.
    implementation: None (see above), 'xla', 'pallas_gpu' or 'pallas_tpu'.
      A kernel forced on another backend runs in Pallas' interpreter (exact,
      very slow: tests only); the kernels take no bias.

  Returns:
    `[batch, q_local, heads, head_dim]` in q's dtype.
  """
  chex.assert_rank([q, k, v], 4)
  if k.shape != v.shape:
    raise ValueError(f"ring_attention: k and v shapes differ: {k.shape} vs {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"ring_attention: q {q.shape} and k {k.shape} must agree on "
                     "batch, heads and head_dim")
  b, n, h, _ = q.shape
  q_chunk = n if chunk_size is None else int(chunk_size)
  if q_chunk < 1 or n % q_chunk:
    raise ValueError(f"ring_attention: chunk_size {chunk_size} must be a positive divisor "
                     f"of the local query length {n}")
  if bias is not None:
    kv_global = k.shape[1] * lax.axis_size(axis_name)
    bias = _as_4d(bias, (b, h, n, kv_global), "ring_attention: bias",
                  dims="[batch, heads, q_local, kv_global]")
  backend = jax.default_backend()
  checked = bool(_vma(q))  # inside shard_map(check_vma=True)
  if implementation is None:
    implementation = choose_ring_implementation(backend, n, k.shape[1], q.shape[-1],
                                                has_bias=bias is not None)
    if checked:
      implementation = "xla"  # the kernels cannot run under vma checking (below)
  to_heads_first = lambda x: x.transpose(0, 2, 1, 3)  # block products become batched matmuls
  if implementation == "xla":
    out = _ring(axis_name, q_chunk, to_heads_first(q), to_heads_first(k), to_heads_first(v),
                bias)
    return to_heads_first(out)
  if implementation not in RING_IMPLEMENTATIONS:
    raise ValueError(f"ring_attention: implementation {implementation!r} is not one of "
                     f"{RING_IMPLEMENTATIONS}")
  if bias is not None:
    raise ValueError(f"ring_attention: the {implementation!r} kernel takes no bias; "
                     "use implementation='xla'")
  if not block_kernels.supports(implementation, n, k.shape[1], q.shape[-1]):
    raise ValueError(f"ring_attention: the {implementation!r} kernel cannot tile local "
                     f"shards q {q.shape}, k {k.shape}; use implementation='xla'")
  if checked:
    # jax 0.10's Pallas ops declare their outputs without varying mesh axes,
    # which shard_map's vma check rejects.
    raise ValueError(f"ring_attention: the {implementation!r} kernel needs the enclosing "
                     "jax.shard_map(..., check_vma=False)")
  interpret = kernels.backend_of_kernel(implementation) != backend
  if block_kernels.TOKEN_AXIS[implementation] == 1:  # the library layout already
    return _kernel_ring(axis_name, implementation, interpret, q, k, v)
  out = _kernel_ring(axis_name, implementation, interpret, to_heads_first(q),
                     to_heads_first(k), to_heads_first(v))
  return to_heads_first(out)


# ---------------------------------------------------------------------------
# Axial attention over a sharded spatial axis (inside shard_map).
# ---------------------------------------------------------------------------


def _normalize_axis(axis: int, num: int, what: str) -> int:
  if not -num <= axis < num:
    raise ValueError(f"{what} {axis} out of range for {num} spatial dims")
  return axis % num


def _split_axis(q: Array, k: Array, sharded: int, size: int) -> int:
  """Array axis to shard while the sharded spatial axis is gathered.

  Heads first (attention is independent per head, and they keep every line
  whole); otherwise any other spatial axis that P divides.
  """
  heads_axis = q.ndim - 2
  if q.shape[heads_axis] % size == 0:
    return heads_axis
  for a in range(q.ndim - 3):
    if a != sharded and q.shape[1 + a] % size == 0 and k.shape[1 + a] % size == 0:
      return 1 + a
  raise ValueError(
      f"all_to_all_axial_attention: to gather spatial axis {sharded} over {size} "
      f"devices, the heads ({q.shape[heads_axis]}) or another local spatial axis "
      f"(shape {q.shape[1:-2]}) must be divisible by {size}")


def all_to_all_axial_attention(q: Array, k: Array, v: Array, *, axis: int,
                               axis_name: str, sharded_axis: int = 0,
                               chunk_size: int | None = None) -> Array:
  """Axial attention on spatial shards; all-to-all when attending along the sharded axis.

  Call inside `shard_map`. The arrays are this device's contiguous slice of
  spatial axis `sharded_axis`, sharded over mesh axis `axis_name`.

  Args:
    q, k, v: `[batch, *spatial_local, heads, head_dim]`, 2 or 3 spatial axes
      (k/v may differ from q in length along `axis` only).
    axis: spatial axis to attend along (0 = first spatial axis).
    axis_name: mesh axis that shards spatial axis `sharded_axis`.
    sharded_axis: which spatial axis is sharded.
    chunk_size: forwarded to `axial_attention`.

  Returns:
    Same shape, dtype and sharding as q.
  """
  num = _num_spatial(q, "all_to_all_axial_attention")
  axis = _normalize_axis(axis, num, "all_to_all_axial_attention: axis")
  sharded_axis = _normalize_axis(sharded_axis, num, "all_to_all_axial_attention: sharded_axis")
  size = lax.axis_size(axis_name)
  if axis != sharded_axis or size == 1:
    # Every line along `axis` is already whole on this device.
    return axial_attention(q, k, v, axis=axis, chunk_size=chunk_size)
  split = _split_axis(q, k, sharded_axis, size)
  gathered = 1 + sharded_axis
  # tiled all_to_all: chunk j of `split` goes to device j, and the received
  # chunks are concatenated along `gathered` in device order, which is the
  # global order of a contiguous sharding.
  gather = lambda x: lax.all_to_all(x, axis_name, split, gathered, tiled=True)
  out = axial_attention(gather(q), gather(k), gather(v), axis=axis, chunk_size=chunk_size)
  return lax.all_to_all(out, axis_name, gathered, split, tiled=True)


# ---------------------------------------------------------------------------
# Wrappers over global arrays and a Mesh.
# ---------------------------------------------------------------------------


def _axis_size(mesh: Mesh, name: str | None, what: str) -> int:
  if name is None:
    return 1
  if name not in mesh.shape:
    raise ValueError(f"{what} {name!r} is not an axis of the mesh {dict(mesh.shape)}"
                     + ("; pass batch_axis=None for no batch sharding" if what == "batch_axis" else ""))
  return mesh.shape[name]


def _check_divisible(length: int, size: int, what: str, axis_desc: str) -> None:
  if length % size:
    raise ValueError(f"{what}: {axis_desc} of length {length} is not divisible by "
                     f"the {size} devices it is sharded over")


def _place(x: Array, mesh: Mesh, spec: P) -> Array:
  # JAX 0.10's shard_map checks that inputs already carry its in_specs.
  return jax.device_put(x, NamedSharding(mesh, spec))


def sequence_parallel_full_attention(q: Array, k: Array, v: Array, *, mesh: Mesh,
                                     seq_axis: str = "seq",
                                     batch_axis: str | None = "data",
                                     bias: Array | None = None,
                                     chunk_size: int | None = None,
                                     implementation: str | None = None) -> Array:
  """Full attention with tokens sharded over `seq_axis` (ring) and batch over `batch_axis`.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k, v: `[batch, kv_len, heads, head_dim]`.
    mesh: device mesh holding `seq_axis` (and `batch_axis` unless None).
    seq_axis: mesh axis that shards q_len and kv_len.
    batch_axis: mesh axis that shards batch, or None to replicate it.
    bias: optional, broadcastable to `[batch, heads, q_len, kv_len]`; sharded
      along its query axis.
    chunk_size: queries per inner step of each hop (see `ring_attention`).
    implementation: what each hop runs (see `ring_attention`).

  Returns:
    `[batch, q_len, heads, head_dim]`, sharded `P(batch_axis, seq_axis)`.
  """
  chex.assert_rank([q, k, v], 4)
  name = "sequence_parallel_full_attention"
  seq = _axis_size(mesh, seq_axis, "seq_axis")
  data = _axis_size(mesh, batch_axis, "batch_axis")
  _check_divisible(q.shape[0], data, name, "batch")
  _check_divisible(q.shape[1], seq, name, "q tokens")
  _check_divisible(k.shape[1], seq, name, "kv tokens")
  spec = P(batch_axis, seq_axis)
  args = [_place(x, mesh, spec) for x in (q, k, v)]
  in_specs = [spec] * 3
  if bias is not None:
    bias = _as_4d(bias, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]), f"{name}: bias")
    bias_spec = P(batch_axis if bias.shape[0] > 1 else None, None,
                  seq_axis if bias.shape[2] > 1 else None, None)
    args.append(_place(bias, mesh, bias_spec))
    in_specs.append(bias_spec)
  if implementation is None:
    implementation = choose_ring_implementation(
        jax.default_backend(), q.shape[1] // seq, k.shape[1] // seq, q.shape[-1],
        has_bias=bias is not None)
  attend = lambda q, k, v, bias=None: ring_attention(q, k, v, axis_name=seq_axis, bias=bias,
                                                     chunk_size=chunk_size,
                                                     implementation=implementation)
  return jax.shard_map(attend, mesh=mesh, in_specs=tuple(in_specs), out_specs=spec,
                       check_vma=implementation == "xla")(*args)


def sequence_parallel_axial_attention(q: Array, k: Array, v: Array, *, axis: int, mesh: Mesh,
                                      seq_axis: str = "seq", sharded_spatial_axis: int = 0,
                                      batch_axis: str | None = "data",
                                      chunk_size: int | None = None) -> Array:
  """Axial attention with one spatial axis sharded over `seq_axis`.

  Args:
    q, k, v: `[batch, *spatial, heads, head_dim]`, 2 or 3 spatial axes.
    axis: spatial axis to attend along (0 = first spatial axis).
    mesh: device mesh holding `seq_axis` (and `batch_axis` unless None).
    seq_axis: mesh axis that shards spatial axis `sharded_spatial_axis`.
    sharded_spatial_axis: which spatial axis is sharded (0 = depth in 3D,
      height in 2D).
    batch_axis: mesh axis that shards batch, or None to replicate it.
    chunk_size: forwarded to `axial_attention`.

  Returns:
    Same shape as q, sharded like the inputs:
    `P(batch_axis, ..., seq_axis at the sharded spatial axis)`.
  """
  name = "sequence_parallel_axial_attention"
  num = _num_spatial(q, name)
  sharded = _normalize_axis(sharded_spatial_axis, num, f"{name}: sharded_spatial_axis")
  _normalize_axis(axis, num, f"{name}: axis")
  seq = _axis_size(mesh, seq_axis, "seq_axis")
  data = _axis_size(mesh, batch_axis, "batch_axis")
  _check_divisible(q.shape[0], data, name, "batch")
  for x, what in ((q, "q"), (k, "k")):
    _check_divisible(x.shape[1 + sharded], seq, name, f"{what} spatial axis {sharded}")
  spec = P(batch_axis, *(seq_axis if a == sharded else None for a in range(sharded + 1)))
  args = [_place(x, mesh, spec) for x in (q, k, v)]
  attend = functools.partial(all_to_all_axial_attention, axis=axis, axis_name=seq_axis,
                             sharded_axis=sharded, chunk_size=chunk_size)
  return jax.shard_map(attend, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(*args)


# ---------------------------------------------------------------------------
# Inside a jitted model: logical-axis sharding and a pluggable attention_fn.
# ---------------------------------------------------------------------------

# Logical names of a generator's token grid `[batch, *spatial, channels]`.
SPATIAL_NAMES = {2: ("height", "width"), 3: ("depth", "height", "width")}


def activation_names(num_spatial: int) -> tuple[str, ...]:
  """('batch', 'depth', 'height', 'width', 'embed') for 3D, without 'depth' for 2D."""
  return ("batch",) + SPATIAL_NAMES[num_spatial] + ("embed",)


@dataclasses.dataclass(frozen=True)
class SequenceSharding:
  """How a model's token grids lie on a mesh; the model stays device-agnostic.

  Built by the trainer (`medgen_jax.train.parallel`) from
  `config.parallel.logical_axis_rules` when the mesh has `seq > 1`, and handed
  to the generator, which (a) constrains its attention-stage activations with
  `constrain` so XLA's SPMD partitioner keeps them sharded, and (b) runs
  attention through `attention_fn`, whose `shard_map` exchanges tokens
  between the `seq` shards explicitly (ring or all-to-all).

  Attributes:
    mesh: the device mesh (axes e.g. ('data', 'seq')).
    rules: logical axis rules, e.g. (('batch', 'data'), ('depth', 'seq')).
    seq_axis: the mesh axis that shards a spatial axis of the token grid.
  """
  mesh: Mesh
  rules: tuple[tuple[str, str | None], ...]
  seq_axis: str = "seq"

  def spec(self, names: tuple[str | None, ...]) -> P:
    """PartitionSpec of an array whose axes have logical `names` (unmapped = replicated)."""
    return nn.logical_to_mesh_axes(names, self.rules)

  def constrain(self, x: Array) -> Array:
    """`x` `[batch, *spatial, channels]` pinned to the layout the rules give its axes."""
    return nn.with_logical_constraint(x, activation_names(x.ndim - 2), rules=self.rules,
                                      mesh=self.mesh)

  def sharded_spatial_axis(self, num_spatial: int) -> int | None:
    """Index (0 = first) of the spatial axis the rules map to `seq_axis`, or None."""
    spec = self.spec(SPATIAL_NAMES[num_spatial])
    hits = [a for a, mesh_axis in enumerate(spec) if mesh_axis == self.seq_axis]
    return hits[0] if hits else None

  def attention_fn(self, form: SequenceParallelForm) -> Callable[..., Array]:
    """A registry-signature attention function over seq-sharded global arrays.

    The returned `fn(q, k, v, *, window_size, shift, bias, chunk_size)` takes
    q/k/v `[batch, *spatial, heads, head_dim]` (global, inside jit) and runs
    `form` (a variant's `sequence_parallel` entry: `RING` or `ALL_TO_ALL`) in
    a `shard_map` over every mesh axis the layout uses. Values equal the
    unsharded variant up to float rounding.
    """
    return functools.partial(_seq_sharded_attention, self, form)


def _ring_attend(q: Array, k: Array, v: Array, *, axis_name: str, sharded_axis: int,
                 chunk_size, implementation: str) -> Array:
  """Full attention over the row-major flattened grid of local shards, by `ring_attention`."""
  del sharded_axis  # always the first: a depth slab is a contiguous token block
  b, heads, dim = q.shape[0], q.shape[-2], q.shape[-1]
  flat = lambda x: x.reshape(b, -1, heads, dim)
  return ring_attention(flat(q), flat(k), flat(v), axis_name=axis_name,
                        chunk_size=chunk_size, implementation=implementation).reshape(q.shape)


def _all_to_all_attend(q: Array, k: Array, v: Array, *, axis_name: str, sharded_axis: int,
                       chunk_size, implementation: str) -> Array:
  """Axial attention of local shards summed over the spatial axes, as the unsharded variant sums."""
  del implementation  # the local lines use `full_attention`'s own choice
  outs = [all_to_all_axial_attention(q, k, v, axis=a, axis_name=axis_name,
                                     sharded_axis=sharded_axis, chunk_size=chunk_size)
          for a in range(q.ndim - 3)]
  return sum(outs[1:], outs[0])


def _ring_implementation(q: Array, seq: int) -> str:
  """The per-hop kernel for global q over `seq` shards (`choose_ring_implementation`)."""
  tokens = math.prod(q.shape[1:-2]) // seq
  return choose_ring_implementation(jax.default_backend(), tokens, tokens, q.shape[-1],
                                    has_bias=False)


@dataclasses.dataclass(frozen=True)
class SequenceParallelForm:
  """How a variant runs with one spatial axis of its token grid sharded over `seq`.

  Attributes:
    name: the exchange, for messages ('ring', 'all-to-all').
    attend: `attend(q, k, v, *, axis_name, sharded_axis, chunk_size,
      implementation)` on local shards inside `shard_map`.
    implementation: `implementation(q, seq)` -> the kernel each step uses for
      global q over `seq` shards ('xla' or a fused one).
    contiguous_blocks: the exchange passes contiguous blocks of the row-major
      flattened grid, so the sharded axis must be the first spatial axis and a
      chunk_size must divide the local tokens.
    regroups_heads: the exchange trades the sharded axis for a sharding of the
      heads or of another local axis, one of which must divide by `seq`.
  """
  name: str
  attend: Callable[..., Array]
  implementation: Callable[[Array, int], str]
  contiguous_blocks: bool = False
  regroups_heads: bool = False


RING = SequenceParallelForm("ring", _ring_attend, _ring_implementation, contiguous_blocks=True)
ALL_TO_ALL = SequenceParallelForm("all-to-all", _all_to_all_attend, lambda q, seq: "xla",
                                  regroups_heads=True)


def _seq_sharded_attention(layout: SequenceSharding, form: SequenceParallelForm, q: Array,
                           k: Array, v: Array, *, window_size=None, shift=None, bias=None,
                           chunk_size=None) -> Array:
  del window_size, shift  # only meaningful for windowed variants
  name = f"sequence-parallel {form.name} attention"
  if bias is not None:
    raise ValueError(f"{name}: takes no bias")
  num = _num_spatial(q, name)
  sharded = layout.sharded_spatial_axis(num)
  if sharded is None:
    raise ValueError(f"{name}: logical_axis_rules {layout.rules} map none of "
                     f"{SPATIAL_NAMES[num]} to mesh axis {layout.seq_axis!r}")
  if form.contiguous_blocks and sharded != 0:
    raise ValueError(f"{name}: needs contiguous token blocks, i.e. the first "
                     f"spatial axis {SPATIAL_NAMES[num][0]!r} sharded; got axis {sharded}")
  spec = layout.spec(activation_names(num)[:-1] + ("heads", "head_dim"))
  # shard_map needs every sharded dimension divisible by its devices; a batch
  # that is not (e.g. 1 at init) is replicated over 'data' instead.
  spec = P(*(None if axis is not None and dim % _mesh_size(layout.mesh, axis) and a != 1 + sharded
             else axis for a, (dim, axis) in enumerate(zip(q.shape, spec))))
  seq = layout.mesh.shape[layout.seq_axis]
  for x, what in ((q, "q"), (k, "k")):
    _check_divisible(x.shape[1 + sharded], seq, name, f"{what} spatial axis {sharded}")
  implementation = form.implementation(q, seq)
  attend = functools.partial(form.attend, axis_name=layout.seq_axis, sharded_axis=sharded,
                             chunk_size=chunk_size, implementation=implementation)
  # A fused kernel per hop needs vma checking off (see `ring_attention`).
  return jax.shard_map(attend, mesh=layout.mesh, in_specs=(spec,) * 3, out_specs=spec,
                       check_vma=implementation == "xla")(q, k, v)


def _mesh_size(mesh: Mesh, axis: str | tuple[str, ...]) -> int:
  return math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
