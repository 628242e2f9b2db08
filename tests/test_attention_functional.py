"""Chunked == unchunked attention, attention weights, transforms and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medgen_jax.attention import (ATTENTION_VARIANTS, attention_weights, axial_attention,
                                  full_attention, half_window_shift, shifted_window_mask,
                                  window_attention)


def _normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def _values_and_grads(f, args):
  """f's output and grads of sum(out * r) w.r.t. all args, in one jit."""
  r = _normal(123, jax.eval_shape(f, *args).shape)

  def loss(*a):
    out = f(*a)
    return jnp.sum(out.astype(jnp.float32) * r), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, tuple(range(len(args))), has_aux=True))(*args)
  return out, grads


CHUNK_CASES = [
    # n, m, chunk, bias shape, mask shape
    (16, 16, 4, None, None),  # divisible, several blocks
    (13, 9, (5, 2), (2, 13, 9), None),  # odd lengths (padded tails), cross, per-head bias
    (11, 11, 3, (1, 1, 1, 11), (2, 1, 11, 11)),  # key bias, per-batch mask
    (7, 10, 16, (2, 1, 7, 10), (1, 1, 1, 10)),  # single block, key-padding mask
]


@pytest.mark.parametrize("n,m,chunk,bias_shape,mask_shape", CHUNK_CASES)
def test_chunked_matches_unchunked(n, m, chunk, bias_shape, mask_shape):
  q = _normal(0, (2, n, 2, 8))
  k, v = _normal(1, (2, m, 2, 8)), _normal(2, (2, m, 2, 8))
  args = [q, k, v]
  if bias_shape:
    args.append(_normal(3, bias_shape))
  mask = None
  if mask_shape:
    mask = np.array(jax.random.bernoulli(jax.random.PRNGKey(4), 0.6, mask_shape))
    mask[..., 0] = True

  def attend(chunk_size):
    def f(q, k, v, *bias):
      return full_attention(q, k, v, bias=bias[0] if bias else None, mask=mask,
                            chunk_size=chunk_size)
    return f

  want, want_grads = _values_and_grads(attend(None), args)
  got, got_grads = _values_and_grads(attend(chunk), args)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_chunked_fully_masked_row_matches_jax():
  """JAX averages all values for a fully masked row; the chunked path must too."""
  q, k, v = _normal(0, (1, 5, 1, 4)), _normal(1, (1, 6, 1, 4)), _normal(2, (1, 6, 1, 4))
  mask = np.ones((1, 1, 5, 6), bool)
  mask[0, 0, 2] = False
  args = (q, k, v)
  want, want_grads = _values_and_grads(lambda *a: full_attention(*a, mask=mask), args)
  got, got_grads = _values_and_grads(lambda *a: full_attention(*a, mask=mask, chunk_size=4),
                                     args)
  np.testing.assert_allclose(got[0, 2, 0], v[0, :, 0].mean(0), atol=1e-6)
  np.testing.assert_allclose(got, want, atol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_chunked_bfloat16_close_to_float32():
  q, k, v = (_normal(i, (1, 20, 2, 16)) for i in range(3))
  want = full_attention(q, k, v)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = jax.jit(lambda q, k, v: full_attention(q, k, v, chunk_size=8))(*bf)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)
  grads = jax.grad(lambda q: full_attention(q, *bf[1:], chunk_size=8).astype(jnp.float32).sum())(bf[0])
  assert grads.dtype == jnp.bfloat16 and bool(jnp.isfinite(grads.astype(jnp.float32)).all())


def test_chunked_under_vmap():
  q, k, v = (_normal(i, (3, 2, 9, 1, 4)) for i in range(3))
  got = jax.vmap(lambda q, k, v: full_attention(q, k, v, chunk_size=4))(q, k, v)
  want = jnp.stack([full_attention(q[i], k[i], v[i]) for i in range(3)])
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_chunked_memory_is_linear():
  """The compiled fwd+bwd must never hold an [N, N] score matrix."""
  n = 1024
  q, k, v = (jax.ShapeDtypeStruct((1, n, 1, 8), jnp.float32) for _ in range(3))
  grad = jax.grad(lambda q, k, v: full_attention(q, k, v, chunk_size=128).sum(), (0, 1, 2))
  stats = jax.jit(grad).lower(q, k, v).compile().memory_analysis()
  if stats is None:
    pytest.skip("backend reports no memory analysis")
  assert stats.temp_size_in_bytes < n * n * 4 / 4, stats.temp_size_in_bytes


def test_attention_weights_hand_computed():
  # One head, head_dim 4: logits = q.k / 2.
  q = jnp.asarray([[[[2.0, 0, 0, 0]]]])  # [1, 1, 1, 4]
  k = jnp.asarray([[[[1.0, 0, 0, 0]], [[0, 0, 0, 0]], [[-1.0, 0, 0, 0]]]])  # [1, 3, 1, 4]
  w = attention_weights(q, k)
  logits = np.array([1.0, 0.0, -1.0])
  np.testing.assert_allclose(w[0, 0, 0], np.exp(logits) / np.exp(logits).sum(), rtol=1e-6)
  masked = attention_weights(q, k, mask=np.array([True, False, True]),
                             bias=np.array([0.0, 0.0, 2.0]))
  np.testing.assert_allclose(masked[0, 0, 0], [0.5, 0.0, 0.5], atol=1e-6)


def test_attention_weights_consistent_with_full_attention():
  q, k, v = _normal(0, (2, 6, 2, 4)), _normal(1, (2, 5, 2, 4)), _normal(2, (2, 5, 2, 4))
  w = attention_weights(q, k)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(jnp.einsum("bhnm,bmhd->bnhd", w, v), full_attention(q, k, v),
                             atol=1e-5)


def test_shifted_window_mask_regions():
  # 1 axis of 4 with window 2, shift 1: rolled order is [1, 2 | 3, 0]; 3 and 0 split.
  mask = shifted_window_mask((4, 2), (2, 2), (1, 0))
  assert mask.shape == (2, 4, 4)
  assert mask[0].all()
  # Second window holds rows (3, 0) x cols (0, 1): tokens 0,1 = row 3; 2,3 = row 0.
  np.testing.assert_array_equal(mask[1], np.kron(np.eye(2, dtype=bool), np.ones((2, 2), bool)))


def test_all_variants_jit_grad_bf16():
  x = _normal(0, (1, 4, 4, 2, 4), jnp.bfloat16)
  fns = [
      lambda q: axial_attention(q, q, q, axis=1),
      lambda q: window_attention(q, q, q, window_size=2, shift=1),
      lambda q: full_attention(q.reshape(1, 16, 2, 4), q.reshape(1, 16, 2, 4),
                               q.reshape(1, 16, 2, 4), chunk_size=8),
  ]
  for f in fns:
    out = jax.jit(f)(x)
    assert out.dtype == jnp.bfloat16
    g = jax.jit(jax.grad(lambda q: f(q).astype(jnp.float32).sum()))(x)
    assert bool(jnp.isfinite(g.astype(jnp.float32)).all())


def test_inside_shard_map():
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  q = jax.device_put(_normal(0, (2, 4, 4, 2, 4)), sharding)

  def local(q):
    flat = q.reshape(q.shape[0], 16, 2, 4)
    return (window_attention(q, q, q, window_size=2, shift=1)
            + full_attention(flat, flat, flat, chunk_size=8).reshape(q.shape))

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  np.testing.assert_allclose(f(q), local(q), atol=1e-5)


def test_errors_are_clear():
  x5 = jnp.zeros((1, 6, 8, 2, 4))
  with pytest.raises(ValueError, match=r"\(6, 8\).*\(4, 4\)"):
    window_attention(x5, x5, x5, window_size=4)
  with pytest.raises(ValueError, match="shift"):
    window_attention(x5, x5, x5, window_size=2, shift=2)
  with pytest.raises(ValueError, match="bias"):
    window_attention(x5, x5, x5, window_size=2, bias=jnp.zeros((2, 3, 3)))
  with pytest.raises(ValueError, match="axis"):
    axial_attention(x5, x5, x5, axis=2)
  with pytest.raises(ValueError, match="spatial"):
    x7 = jnp.zeros((1, 2, 2, 2, 2, 2, 4))  # 4 spatial dims
    axial_attention(x7, x7, x7, axis=0)
  q = jnp.zeros((1, 5, 2, 4))
  with pytest.raises(ValueError, match="head"):
    full_attention(q, jnp.zeros((1, 5, 3, 4)), jnp.zeros((1, 5, 3, 4)))
  with pytest.raises(ValueError, match="broadcast"):
    full_attention(q, q, q, bias=jnp.zeros((3, 5, 5)))
  with pytest.raises(ValueError, match="chunk_size"):
    full_attention(q, q, q, chunk_size=0)


def test_window_shifted_variant_does_not_shift_along_a_spanned_axis():
  assert half_window_shift((4, 4), (4, 8)) == (0, 2)
  assert half_window_shift((2, 4, 4), (8, 4, 16)) == (1, 0, 2)
  q, k, v = (_normal(s, (2, 4, 8, 2, 4)) for s in range(3))
  np.testing.assert_array_equal(
      ATTENTION_VARIANTS["window_shifted"].fn(q, k, v, window_size=4),
      window_attention(q, k, v, window_size=4, shift=(0, 2)))
