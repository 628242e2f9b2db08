"""Fused flash kernels over one key/value block, with the block's log-sum-exp.

The sequence-parallel ring (`sequence_parallel.ring_attention`) attends a
device's queries to one key/value block per hop. With a fused kernel each hop
is one kernel call:

* forward: the kernel returns the block's output `o_t` and the log-sum-exp
  `lse_t` of its logits; the hops are merged exactly by
  `lse = logaddexp(lse, lse_t)`, `o = o * exp(lse_old - lse) + o_t * exp(lse_t - lse)`;
* backward: a flash backward recomputes the probabilities as
  `exp(logits - lse)` and uses `delta = sum(dout * out)`. Given the *global*
  output and log-sum-exp instead of the block's own, it returns the block's
  exact share of dq and the block's complete dk and dv.

Two kernels, each used through jax's own reference implementation:

| name | kernel | layout of q/k/v | lengths |
|---|---|---|---|
| 'pallas_gpu' | `jax.experimental.pallas.ops.gpu.attention` (Triton) | `[batch, tokens, heads, head_dim]` | `kernels.pallas_gpu_supports` |
| 'pallas_tpu' | `jax.experimental.pallas.ops.tpu.flash_attention` (Mosaic) | `[batch, heads, tokens, head_dim]` | `kernels.pallas_tpu_supports` |

Neither takes a bias or a mask here. The forward passes use the public entry
points (`mha(..., return_residuals=True)`; the TPU kernel's residual output);
the backward passes call the modules' VJP rules (`_mha_backward`,
`_flash_attention_bwd`) with the global statistics, since jax exposes no
public backward that takes them. Both are checked against a dense reference
in interpret mode on CPU (tests/test_block_kernels.py), so a change of those
private signatures in a new jax release fails the tests rather than the
training run. cuDNN is not among them: jax's cuDNN attention has no public
backward that accepts another block's statistics.

The Pallas GPU kernel keeps its log-sum-exp in base 2 (it computes with
`exp2` of logits pre-scaled by log2(e)); `pallas_gpu_forward` returns the
natural one and `pallas_gpu_backward` converts it back.
"""
from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_ops
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_tpu_ops

from medgen_jax.attention import kernels

Array = jax.Array

BLOCK_KERNELS = ("pallas_gpu", "pallas_tpu")
# Where each kernel's token axis is: 1 in [B, N, h, d], 2 in [B, h, N, d].
TOKEN_AXIS = {"pallas_gpu": 1, "pallas_tpu": 2}

_LN2 = math.log(2.0)


def _check_name(name: str) -> None:
  if name not in BLOCK_KERNELS:
    raise ValueError(f"unknown block kernel {name!r}; expected one of {BLOCK_KERNELS}")


def supports(name: str, q_len: int, kv_len: int, head_dim: int) -> bool:
  """Whether kernel `name` takes a query block of `q_len` against `kv_len` keys."""
  _check_name(name)
  if name == "pallas_gpu":
    return kernels.pallas_gpu_supports(q_len, kv_len)
  return kernels.pallas_tpu_supports(q_len, kv_len, head_dim)


def forward(name: str, q: Array, k: Array, v: Array, *,
            interpret: bool = False) -> tuple[Array, Array]:
  """Softmax attention of q against one key/value block, and its log-sum-exp.

  Args:
    name: 'pallas_gpu' or 'pallas_tpu'.
    q: `[batch, q_len, heads, head_dim]` for 'pallas_gpu',
      `[batch, heads, q_len, head_dim]` for 'pallas_tpu'.
    k, v: the same layout with kv_len tokens.
    interpret: run the kernel in Pallas' interpreter (CPU; for tests).

  Returns:
    out in q's layout and dtype; lse float32 `[batch, heads, q_len]`, the
    natural log-sum-exp of the scaled logits of each query row.
  """
  _check_name(name)
  head_dim = q.shape[-1]
  scale = 1.0 / math.sqrt(head_dim)
  if name == "pallas_gpu":
    out, lse2 = pallas_gpu_ops.mha(q, k, v, None, sm_scale=scale, interpret=interpret,
                                   return_residuals=True)
    return out, lse2 * _LN2
  with _tpu_interpret(interpret):
    out, row_sum, row_max = pallas_tpu_ops._flash_attention(  # pylint: disable=protected-access
        q, k, v, None, None, True, False, scale,
        kernels.tpu_block_sizes(q.shape[2], k.shape[2]), False)
  return out, row_max + jnp.log(row_sum)


def backward(name: str, q: Array, k: Array, v: Array, out: Array, lse: Array,
             dout: Array, *, interpret: bool = False) -> tuple[Array, Array, Array]:
  """This block's share of dq, and its dk and dv, given the global out and lse.

  Args:
    name, q, k, v, interpret: as in `forward`.
    out: the attention output over *all* key blocks, in q's layout.
    lse: float32 `[batch, heads, q_len]`, the log-sum-exp over all key blocks.
    dout: the cotangent of `out`.

  Returns:
    (dq, dk, dv) in the layouts and dtypes of q, k and v.
  """
  _check_name(name)
  scale = 1.0 / math.sqrt(q.shape[-1])
  if name == "pallas_gpu":
    res = (q, k, v, None, out, lse / _LN2)
    dq, dk, dv, _ = pallas_gpu_ops._mha_backward(  # pylint: disable=protected-access
        scale, False, pallas_gpu_ops.BlockSizes.get_default(), "triton", None, 2, None,
        interpret, False, False, res, dout)
    return dq, dk, dv
  # The TPU kernel recomputes p = exp(logits - m) / l: m = lse, l = 1.
  res = (q, k, v, None, None, out, jnp.ones_like(lse), lse)
  with _tpu_interpret(interpret):
    dq, dk, dv, _, _ = pallas_tpu_ops._flash_attention_bwd(  # pylint: disable=protected-access
        False, False, scale, kernels.tpu_block_sizes(q.shape[2], k.shape[2]), False, res,
        dout)
  return dq, dk, dv


def _tpu_interpret(interpret: bool):
  # Pallas TPU kernels traced inside this context run in the TPU interpreter.
  return pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
