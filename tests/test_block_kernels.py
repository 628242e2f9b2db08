"""Per-block flash kernels with their log-sum-exp: merged blocks equal dense attention.

Each kernel runs in Pallas' interpreter on the CPU. The keys are split into
two blocks; the blocks' outputs are merged by their log-sum-exps, and each
block's backward gets the merged (global) output and log-sum-exp. Values,
log-sum-exps and q/k/v gradients are compared with dense softmax attention
written here with numpy-style jnp ops.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.attention import block_kernels

B, N, H, D = 2, 128, 2, 32  # the TPU kernel tiles tokens by 128


def dense(q, k, v):
  """`[B, N, h, d]` softmax attention and the log-sum-exp `[B, h, N]` of its logits."""
  s = jnp.einsum("bnhd,bmhd->bhnm", q, k, precision="highest") / math.sqrt(q.shape[-1])
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhnm,bmhd->bnhd", p, v, precision="highest"), jax.nn.logsumexp(s, -1)


def _inputs():
  keys = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(keys[0], (B, N, H, D))
  k = jax.random.normal(keys[1], (B, 2 * N, H, D))
  v = jax.random.normal(keys[2], (B, 2 * N, H, D))
  dout = jax.random.normal(keys[3], (B, N, H, D))
  return q, k, v, dout


def merged_halves(name, q, k, v, dout, *, interpret):
  """k/v split in two key blocks, each through `name`'s kernel, merged as the ring does.

  The forward outputs merge by their log-sum-exps; each block's backward gets
  the merged (global) output and log-sum-exp, its dq shares add up and its
  dk / dv are that block's rows. All in the library layout `[B, N, h, d]`.

  Returns:
    (out, lse, lse of the first block alone, dq, dk, dv).
  """
  # The kernel's layout: tokens at axis 1 (GPU) or 2 (TPU, heads first).
  axis = block_kernels.TOKEN_AXIS[name]
  to = (lambda x: x) if axis == 1 else (lambda x: x.transpose(0, 2, 1, 3))
  qk, kk, vk, dk_out = map(to, (q, k, v, dout))
  m = k.shape[1] // 2
  halves = lambda x: (jax.lax.slice_in_dim(x, 0, m, axis=axis),
                      jax.lax.slice_in_dim(x, m, 2 * m, axis=axis))
  blocks = list(zip(halves(kk), halves(vk)))

  parts = [block_kernels.forward(name, qk, kb, vb, interpret=interpret) for kb, vb in blocks]
  lse = jnp.logaddexp(parts[0][1], parts[1][1])
  weight = lambda l: to(jnp.exp(l - lse).transpose(0, 2, 1)[..., None])
  out = sum(o * weight(l) for o, l in parts)

  grads = [block_kernels.backward(name, qk, kb, vb, out, lse, dk_out, interpret=interpret)
           for kb, vb in blocks]
  join = lambda a, b: to(jnp.concatenate([a, b], axis=axis))
  return (to(out), lse, parts[0][1], to(grads[0][0] + grads[1][0]),
          join(grads[0][1], grads[1][1]), join(grads[0][2], grads[1][2]))


# The interpreted TPU kernel costs ~9 s here: -m slow (the GPU one stays).
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n == "pallas_tpu" else n
    for n in block_kernels.BLOCK_KERNELS])
def test_two_blocks_merged_by_lse_equal_dense_attention(name):
  q, k, v, dout = _inputs()
  (ref_out, ref_lse), vjp = jax.vjp(lambda *a: dense(*a), q, k, v)
  ref_dq, ref_dk, ref_dv = vjp((dout, jnp.zeros_like(ref_lse)))

  out, lse, first_lse, dq, dk, dv = merged_halves(name, q, k, v, dout, interpret=True)
  np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
  # One block alone: its own lse is that block's logsumexp.
  np.testing.assert_allclose(first_lse, dense(q, k[:, :N], v[:, :N])[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dq, ref_dq, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dk, ref_dk, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dv, ref_dv, rtol=1e-4, atol=1e-4)


def test_supports_and_unknown_names():
  assert block_kernels.supports("pallas_tpu", 256, 128, 64)
  assert not block_kernels.supports("pallas_tpu", 100, 128, 64)
  assert block_kernels.supports("pallas_gpu", 256, 256, 64)
  assert not block_kernels.supports("pallas_gpu", 256, 512, 64)  # fused backward: equal block counts
  with pytest.raises(ValueError, match="unknown block kernel 'cudnn'"):
    block_kernels.supports("cudnn", 128, 128, 64)
