"""Fused attention kernels and the per-backend choice `full_attention` makes.

`choose_implementation` is a pure function of (backend, dtype, shapes, bias /
mask presence), so the dispatch table is tested on a CPU by naming the backend.
What it picks with `implementation=None`:

| backend | no bias, no mask | bias and/or mask |
|---|---|---|
| gpu | 'cudnn' if q/k/v are bf16/fp16 and head_dim % 8 == 0, <= 128; else as with a bias | 'xla' up to 2^28 scores (1 GiB of float32 scores), 'chunked' above |
| tpu | 'pallas_tpu' if q_len and kv_len are multiples of 128 and head_dim <= 128 or a multiple of 128; else as with a bias | 'xla' up to 2^28 scores, 'chunked' above |
| cpu | 'xla' below 512 * 512 scores, 'chunked' from there (blocks: `cpu_chunk_size`) | the same |

("scores" = batch * heads * q_len * kv_len; the CPU threshold counts
q_len * kv_len only, as measured in docs/benchmarks.md.)

Why the bias / mask column never picks a fused kernel: the Pallas TPU kernel
takes a bias only as a dense `[batch, heads, q_len, kv_len]` array and no
boolean mask at all, so the relative position bias (broadcast over the batch)
and the Swin mask would have to be materialised at full size, which is the
quadratic memory the kernel exists to avoid; cuDNN folds a boolean mask into
an additive bias in the input dtype, returns the bias gradient in that dtype
(bf16 for a float32 parameter such as `RelativePositionBias`'s table) and
needs even sequence lengths to train with one; we have not measured that path
on a GPU. Forcing `implementation='cudnn'` or `'pallas_tpu'` still passes a
bias and mask through (see `cudnn_attention` / `pallas_tpu_attention`).

On GPU the dense XLA path is kept below 2^28 scores because there it is much
faster than the scan-based chunked form (at 4,096 tokens, 22.5 ms against
165 ms fwd+bwd on an H200, jax 0.11.2, bf16, 8 heads x 64, batch 16) while its memory still fits; above that
the chunked form keeps memory linear in the sequence length.

The Pallas kernels run on a CPU in interpret mode (`interpret=True`, which
`full_attention` turns on by itself when the backend is not the kernel's):
orders of magnitude slower, for tests only.
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_ops
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_tpu_ops

from medgen_jax.attention.chunked import MASK_VALUE

Array = jax.Array

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "pallas_tpu", "pallas_gpu")

# CPU: the blocked form beats XLA's dense attention, which writes the whole
# [B, h, N, M] score tensor several times, once the score matrix is large: in
# docs/benchmarks.md (2 CPU cores, B=4, 4 heads, head_dim 32, fwd+bwd, float32)
# the two are about even at 256 tokens (3.9 against 4.9 ms), and the blocked
# form is 2.3x faster at 512, 6x at 1,024 and 9-10x at 4,096. Below the
# threshold (short sequences: windows, axial lines) the single dense op stays.
CPU_CHUNKED_MIN_SCORES = 512 * 512
# Default CPU blocks (`cpu_chunk_size`): about 2^21 float32 scores per
# [maps, bq, bk] block of one loop (maps = batch * heads / `cpu_groups`), as
# key blocks of 128 and query blocks as long as that allows. Fwd+bwd at 4,096
# tokens, B=4, 4 heads, head_dim 32 on the 2-core CPU (two loops of 8 maps),
# interleaved in one process: 2048 x 128 449-452 ms, 1024 x 256 432 ms,
# 512 x 256 442 ms, 2048 x 64 550 ms, 4096 x 128 504 ms (the square 128 x 128
# of ~2^18 scores used before: ~1,050 ms with the previous backward, against
# 625-640 ms for 2048 x 64); at 1,024 tokens 1024 x 128 30 ms, 1024 x 64 48
# ms; at 16,384 tokens, B=1 (two loops of 2 heads) 8192 x 128 1.72 s.
# Fewer, longer loop iterations amortise the per-iteration work that is not
# the block's products (dynamic slices, the dq / dk / dv updates, loop
# overhead).
CPU_BLOCK_SCORES = 2 ** 21
CPU_KEY_BLOCK = 128
CPU_MIN_BLOCK = 64
CPU_MAX_BLOCK = 8192
# GPU / TPU: dense XLA attention up to 2^28 scores (1 GiB float32; XLA's
# temporaries are ~2.5x that), the chunked form above. Its blocks are larger
# than on CPU (2^24 scores, 64 MiB) because each loop iteration is a kernel
# launch; not tuned on a device.
ACCEL_DENSE_MAX_SCORES = 2 ** 28
ACCEL_BLOCK_SCORES = 2 ** 24
# cuDNN flash attention in jax 0.10 (jax/_src/cudnn/fused_attention_stablehlo.py,
# check_layout / check_is_flash_attention): q/k/v fp16 or bf16 (fp8 aside),
# head_dim a multiple of 8 and <= 128 (<= 256 from Hopper on; 128 is what
# every cuDNN-capable GPU takes).
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128
# Pallas TPU flash attention (jax/experimental/pallas/ops/tpu/flash_attention.py):
# key blocks are multiples of 128 lanes and must divide kv_len (query blocks
# too, for the backward kernels); head_dim <= 128 or a multiple of 128.
TPU_MIN_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Choice:
  """What `full_attention` runs: an implementation and, for 'chunked', its blocks."""
  implementation: str
  chunk_size: tuple[int, int] | None = None
  reason: str = ""


def _pow2_block(batch_heads: int, budget: int, lo: int, hi: int) -> int:
  side = math.sqrt(budget / max(batch_heads, 1))
  return int(min(hi, max(lo, 2 ** round(math.log2(side)))))


def default_blocks(backend: str, batch: int, heads: int, q_len: int,
                   kv_len: int) -> tuple[int, int]:
  """The chunked form's default `(query_block, key_block)` on `backend`.

  CPU: `cpu_chunk_size`. GPU / TPU: a square power of two in [128, 2048]
  with ~2^24 scores per block over all of batch * heads.
  """
  if backend == "cpu":
    return cpu_chunk_size(batch, heads, q_len, kv_len)
  block = _pow2_block(batch * heads, ACCEL_BLOCK_SCORES, 128, 2048)
  return block, block


def _pow2_at_most(x: float, lo: int, hi: int) -> int:
  return int(min(hi, max(lo, 2 ** math.floor(math.log2(max(x, 1.0))))))


def cpu_chunk_size(batch: int, heads: int, q_len: int, kv_len: int,
                   cores: int | None = None) -> tuple[int, int]:
  """The chunked form's default `(query_block, key_block)` on CPU.

  Per loop (`cpu_groups` loops, one per core) a block holds about
  `CPU_BLOCK_SCORES` scores over the loop's maps: key blocks of
  `CPU_KEY_BLOCK` (128; 64 when even 64-query blocks would exceed the budget)
  and query blocks as long as the budget allows (powers of two in
  [64, 8192], at most q_len).

  Args:
    batch, heads: the attention's batch and heads (maps = batch * heads).
    q_len, kv_len: sequence lengths.
    cores: as in `cpu_groups` (default: os.cpu_count()).
  """
  maps = max(batch * heads // cpu_groups(batch, heads, cores), 1)
  bk = _pow2_at_most(CPU_BLOCK_SCORES / (maps * CPU_MIN_BLOCK), CPU_MIN_BLOCK, CPU_KEY_BLOCK)
  bq = _pow2_at_most(CPU_BLOCK_SCORES / (maps * bk), CPU_MIN_BLOCK, CPU_MAX_BLOCK)
  return min(bq, q_len), min(bk, kv_len)


def cpu_groups(batch: int, heads: int, cores: int | None = None) -> int:
  """Independent chunked loops on CPU: one per core, dividing batch (or heads).

  The largest count <= `cores` (default: os.cpu_count()) that divides the
  batch, or failing that (e.g. batch 1) the heads.
  """
  cores = cores or os.cpu_count() or 1
  for size in (batch, heads):
    for g in range(min(cores, size), 1, -1):
      if size % g == 0:
        return g
  return 1


def cudnn_supports(dtype, head_dim: int) -> bool:
  """Whether cuDNN flash attention takes q/k/v of `dtype` and this head size."""
  return (jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0
          and head_dim <= CUDNN_MAX_HEAD_DIM)


def pallas_tpu_supports(q_len: int, kv_len: int, head_dim: int) -> bool:
  """Whether the Pallas TPU flash kernel takes these lengths and head size."""
  return (q_len % TPU_MIN_BLOCK == 0 and kv_len % TPU_MIN_BLOCK == 0
          and (head_dim <= TPU_MIN_BLOCK or head_dim % TPU_MIN_BLOCK == 0))


def canonical_backend(backend: str) -> str:
  """A jax platform name as this module's backend: 'cuda' and 'rocm' are 'gpu'."""
  return {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)


def choose_implementation(backend: str, dtype, q_shape: tuple[int, ...],
                          kv_shape: tuple[int, ...], *, has_bias: bool,
                          has_mask: bool) -> Choice:
  """The exact attention kernel `full_attention` runs by default (module table).

  Args:
    backend: 'cpu', 'gpu' (CUDA or ROCm; 'cuda' and 'rocm' are read as 'gpu')
      or 'tpu'; anything else is treated like 'cpu'.
    dtype: the dtype of q, k and v.
    q_shape: `[batch, q_len, heads, head_dim]`.
    kv_shape: `[batch, kv_len, heads, head_dim]`.
    has_bias, has_mask: whether a bias / boolean mask is passed.

  Returns:
    A `Choice`; for 'chunked' with its `(query_block, key_block)`.
  """
  backend = canonical_backend(backend)
  b, n, h, d = q_shape
  m = kv_shape[1]
  plain = not (has_bias or has_mask)
  if backend == "gpu" and plain and cudnn_supports(dtype, d):
    return Choice("cudnn", reason="cuDNN flash attention")
  if backend == "tpu" and plain and pallas_tpu_supports(n, m, d):
    return Choice("pallas_tpu", reason="Pallas TPU flash attention")
  if backend in ("gpu", "tpu"):
    if b * h * n * m <= ACCEL_DENSE_MAX_SCORES:
      return Choice("xla", reason="dense scores fit (<= 2^28)")
    return Choice("chunked", default_blocks(backend, b, h, n, m),
                  reason="dense scores > 2^28")
  if n * m < CPU_CHUNKED_MIN_SCORES:
    return Choice("xla", reason="CPU, < 512^2 scores")
  return Choice("chunked", default_blocks("cpu", b, h, n, m), reason="CPU, >= 512^2 scores")


# ---------------------------------------------------------------------------
# Kernels. All take and return the library layout [batch, tokens, heads, head_dim];
# bias / mask are None or 4D, broadcastable to [batch, heads, q_len, kv_len].
# ---------------------------------------------------------------------------


def cudnn_attention(q: Array, k: Array, v: Array, bias: Array | None = None,
                    mask: Array | None = None) -> Array:
  """cuDNN flash attention (`jax.nn.dot_product_attention(implementation='cudnn')`).

  Needs a CUDA GPU with cuDNN, bf16/fp16 q/k/v and a head size cuDNN takes
  (`cudnn_supports`); otherwise jax raises. A bias is cast to q's dtype and
  a boolean mask is folded into it by jax (masked logits get a large negative
  bf16/fp16 value), so bias gradients come back in q's dtype.
  """
  if bias is not None:
    bias = bias.astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                      implementation="cudnn")


def _dense_bias(bias: Array | None, mask: Array | None, shape: tuple[int, ...]) -> Array | None:
  """bias and mask as one float32 additive bias of the full `shape`, or None.

  Masked entries get MASK_VALUE (added to the bias, which it swamps), so a
  fully masked row still averages every value, as in `jax.nn.dot_product_attention`.
  """
  if bias is None and mask is None:
    return None
  out = jnp.zeros(shape, jnp.float32)
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  if mask is not None:
    out = jnp.where(mask, out, MASK_VALUE)
  return out


def _largest_block(length: int, candidates=(512, 256, 128)) -> int:
  for c in candidates:
    if length % c == 0:
      return c
  raise ValueError(f"length {length} is not a multiple of {TPU_MIN_BLOCK}")


def tpu_block_sizes(q_len: int, kv_len: int) -> pallas_tpu_ops.BlockSizes:
  """Forward and backward blocks of the Pallas TPU kernel: the largest of
  512 / 256 / 128 that divides each length."""
  bq, bk = _largest_block(q_len), _largest_block(kv_len)
  return pallas_tpu_ops.BlockSizes(
      block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
      block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
      block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)


def pallas_tpu_attention(q: Array, k: Array, v: Array, bias: Array | None = None,
                         mask: Array | None = None, *, interpret: bool = False) -> Array:
  """Pallas TPU flash attention (`jax.experimental.pallas.ops.tpu.flash_attention`).

  q_len and kv_len must be multiples of 128 and head_dim <= 128 or a multiple
  of 128 (`pallas_tpu_supports`); blocks are the largest of 512 / 256 / 128
  that divide each length. The kernel adds its bias before scaling the
  logits, so q is pre-scaled here and the kernel's scale is 1. A bias or mask
  is materialised as one dense float32 `[batch, heads, q_len, kv_len]` bias
  (the kernel has no broadcasting bias and no boolean mask): quadratic memory.

  Args:
    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, kv_len, heads, head_dim]`.
    bias, mask: as in `full_attention` (4D or None).
    interpret: run the kernel in Pallas' TPU interpreter (CPU; for tests).

  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype.
  """
  b, n, h, d = q.shape
  m = k.shape[1]
  if not pallas_tpu_supports(n, m, d):
    raise ValueError(f"pallas_tpu attention needs q_len and kv_len multiples of "
                     f"{TPU_MIN_BLOCK} and head_dim <= 128 or a multiple of 128; "
                     f"got q {q.shape}, k {k.shape}")
  blocks = tpu_block_sizes(n, m)
  to_heads_first = lambda x: x.transpose(0, 2, 1, 3)
  qs = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
  ab = _dense_bias(bias, mask, (b, h, n, m))

  def call(qs, k, v, ab):
    return pallas_tpu_ops.flash_attention(
        to_heads_first(qs), to_heads_first(k), to_heads_first(v), ab,
        sm_scale=1.0, block_sizes=blocks)
  out = (_tpu_interpreted(call) if interpret else call)(qs, k, v, ab)
  return to_heads_first(out).astype(q.dtype)


def _tpu_interpreted(fn):
  """`fn` with every Pallas TPU call it makes, forward and backward, interpreted.

  `force_tpu_interpret_mode` acts on the kernels traced under it, and a
  backward kernel is traced only when the gradient is taken, so the forward
  and the backward are each traced inside the context.
  """
  @jax.custom_vjp
  def wrapped(*args):
    with pltpu.force_tpu_interpret_mode():
      return fn(*args)

  def fwd(*args):
    with pltpu.force_tpu_interpret_mode():
      return jax.vjp(fn, *args)

  def bwd(vjp_fn, cotangent):
    with pltpu.force_tpu_interpret_mode():
      return vjp_fn(cotangent)

  wrapped.defvjp(fwd, bwd)
  return wrapped


def pallas_gpu_supports(q_len: int, kv_len: int) -> bool:
  """Whether the Pallas GPU (Triton) kernel's default blocks fit these lengths.

  Forward blocks are min(128, length), backward blocks min(32, length); each
  must divide its length, and the fused backward needs as many query as key
  blocks (so q_len == kv_len in practice).
  """
  def fits(length):
    return length % min(128, length) == 0 and length % min(32, length) == 0
  return fits(q_len) and fits(kv_len) and q_len // min(32, q_len) == kv_len // min(32, kv_len)


def pallas_gpu_attention(q: Array, k: Array, v: Array, *, interpret: bool = False) -> Array:
  """Pallas GPU flash attention (`jax.experimental.pallas.ops.gpu.attention.mha`).

  A Triton kernel with no bias and no mask (segment ids only, unused here);
  lengths as in `pallas_gpu_supports`. Not chosen by default: it has not been
  measured against cuDNN or XLA here.

  Args:
    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, kv_len, heads, head_dim]`.
    interpret: run in Pallas' generic interpreter (CPU; for tests).
  """
  if not pallas_gpu_supports(q.shape[1], k.shape[1]):
    raise ValueError(f"pallas_gpu attention needs lengths that its blocks (128 "
                     f"forward, 32 backward) divide, with q_len == kv_len; got q "
                     f"{q.shape}, k {k.shape}")
  return pallas_gpu_ops.mha(q, k, v, None, sm_scale=1.0 / math.sqrt(q.shape[-1]),
                            interpret=interpret)


def backend_of_kernel(implementation: str) -> str | None:
  """The backend a fused kernel compiles for ('gpu' / 'tpu'), None for XLA code."""
  return {"cudnn": "gpu", "pallas_gpu": "gpu", "pallas_tpu": "tpu"}.get(implementation)
