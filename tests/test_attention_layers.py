"""Linen attention layers: wiring against the pure functions, sown q/k, identity at init."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.attention import (CrossModalAttention, MultiHeadAttention,
                                  RelativePositionBias, TransformerBlock, full_attention,
                                  window_attention)

KEY = jax.random.PRNGKey(0)


def _x(shape, seed=1, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def _project(p, x):
  return jnp.einsum("...c,chd->...hd", x, p["kernel"]) + p["bias"]


def _output(p, o):
  return jnp.einsum("...hd,hdc->...c", o, p["kernel"]) + p["bias"]


def test_window_shifted_layer_matches_manual_computation():
  x = _x((2, 4, 4, 8))
  mha = MultiHeadAttention(num_heads=2, attention="window_shifted", window_size=2)
  variables = mha.init(KEY, x, deterministic=True)
  out, state = mha.apply(variables, x, deterministic=True, mutable=["intermediates"])
  p = variables["params"]
  q, k, v = (_project(p[n], x) for n in ("query_proj", "key_proj", "value_proj"))
  np.testing.assert_allclose(state["intermediates"]["query"][0], q, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["intermediates"]["key"][0], k, rtol=1e-5, atol=1e-6)
  rel = RelativePositionBias(2, (2, 2)).apply({"params": p["relative_bias"]})
  want = _output(p["out"], window_attention(q, k, v, window_size=2, shift=1, bias=rel))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_full_layer_with_context_is_cross_attention():
  x, ctx = _x((2, 3, 2, 8)), _x((2, 5, 6), seed=2)
  mha = MultiHeadAttention(num_heads=2, chunk_size=2, qk_norm=True)
  variables = mha.init(KEY, x, context=ctx, deterministic=True)
  out = mha.apply(variables, x, context=ctx, deterministic=True)
  p = variables["params"]
  ln = lambda t, s: ((t - t.mean(-1, keepdims=True))
                     / jnp.sqrt(t.var(-1, keepdims=True) + 1e-6)) * s["scale"] + s["bias"]
  q = ln(_project(p["query_proj"], x.reshape(2, 6, 8)), p["query_norm"])
  k = ln(_project(p["key_proj"], ctx), p["key_norm"])
  v = _project(p["value_proj"], ctx)
  want = _output(p["out"], full_attention(q, k, v)).reshape(2, 3, 2, 8)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention,shape", [
    ("full", (1, 4, 4, 8)), ("axial", (1, 2, 4, 4, 8)), ("window", (1, 4, 4, 8)),
    ("window_shifted", (1, 2, 4, 4, 8))])
def test_every_variant_jit_grad_bf16(attention, shape):
  x = _x(shape, dtype=jnp.bfloat16)
  mha = MultiHeadAttention(num_heads=2, attention=attention, window_size=2,
                           dtype=jnp.bfloat16)
  variables = mha.init(KEY, x, deterministic=True)

  def loss(v):
    out = mha.apply(v, x, deterministic=True)
    return out.astype(jnp.float32).sum(), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)  # one compile
  assert out.shape == shape and out.dtype == jnp.bfloat16
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_layer_errors():
  x = _x((1, 4, 4, 8))
  with pytest.raises(ValueError, match="'axial', 'full', 'window', 'window_shifted'"):
    MultiHeadAttention(2, attention="flash").init(KEY, x, deterministic=True)
  with pytest.raises(ValueError, match=r"window_size=8 must be <= and divide the token "
                                       r"grid \(4, 4\)"):
    MultiHeadAttention(2, attention="window", window_size=8).init(KEY, x, deterministic=True)
  with pytest.raises(ValueError, match="window_size=3 must be <= and divide"):
    MultiHeadAttention(2, attention="window", window_size=3).init(KEY, x, deterministic=True)
  with pytest.raises(ValueError, match="num_heads"):
    MultiHeadAttention(3).init(KEY, x, deterministic=True)
  with pytest.raises(ValueError, match="attention='full'"):
    MultiHeadAttention(2, attention="axial").init(KEY, x, context=_x((1, 3, 8)),
                                                   deterministic=True)
  with pytest.raises(ValueError, match="cond"):
    TransformerBlock(2).init(KEY, x, jnp.zeros((2, 4)), deterministic=True)


def test_cross_modal_masks_missing_tokens():
  x, ctx = _x((2, 5, 8)), _x((2, 3, 8), seed=2)
  cma = CrossModalAttention(num_heads=2)
  present = jnp.asarray([[True, False, True], [False, False, False]])
  variables = cma.init(KEY, x, ctx, context_mask=present, deterministic=True)
  out = cma.apply(variables, x, ctx, context_mask=present, deterministic=True)
  # Masked tokens have no influence whatever their values (not zero-filled).
  moved = ctx.at[:, 1].set(100.0).at[1].set(-50.0)
  np.testing.assert_allclose(cma.apply(variables, x, moved, context_mask=present,
                                       deterministic=True), out, rtol=1e-5, atol=1e-5)
  # Reference: explicit dense attention over [x tokens, present context tokens].
  p = variables["params"]
  for b, keep in enumerate([[0, 2], []]):
    kv_in = jnp.concatenate([x[b], ctx[b, jnp.asarray(keep, int)]], 0)
    q = _project(p["query_proj"], x[b])
    k, v = _project(p["key_proj"], kv_in), _project(p["value_proj"], kv_in)
    w = jax.nn.softmax(jnp.einsum("nhd,mhd->hnm", q, k) / math.sqrt(4), axis=-1)
    want = _output(p["out"], jnp.einsum("hnm,mhd->nhd", w, v))
    np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-5)
  bf = jax.jit(lambda v, a, c: cma.apply(v, a, c, deterministic=True))(
      variables, x.astype(jnp.bfloat16), ctx.astype(jnp.bfloat16))
  assert bf.shape == x.shape
  with pytest.raises(ValueError, match="context_mask"):
    cma.apply(variables, x, ctx, context_mask=present[:, :2], deterministic=True)


def test_transformer_block_identity_at_init_with_cond(attention="window_shifted"):
  x, cond = _x((2, 4, 4, 8)), _x((2, 6), seed=3)
  block = TransformerBlock(num_heads=2, mlp_ratio=2, attention=attention, window_size=2)
  # Under jit: eager dispatch of every op costs seconds here.
  variables = jax.jit(lambda k: block.init(k, x, cond, deterministic=True))(KEY)
  out = jax.jit(lambda v, x, c: block.apply(v, x, c, deterministic=True))(variables, x, cond)
  np.testing.assert_array_equal(out, x)
  # The gates get gradients, so training moves the block off the identity.
  grads = jax.jit(jax.grad(
      lambda v: (block.apply(v, x, cond, deterministic=True) ** 2).sum()))(variables)
  assert float(jnp.abs(grads["params"]["gate_attention"]["Dense_0"]["kernel"]).max()) > 0
  # 'window_shifted' is the explicit shift = window // 2.
  if attention == "window_shifted":
    explicit = TransformerBlock(num_heads=2, mlp_ratio=2, attention="window", window_size=2,
                                shift=1)
    trained = jax.tree_util.tree_map(lambda p: p + 0.1, variables)
    apply = lambda m: jax.jit(lambda v: m.apply(v, x, cond, deterministic=True))(trained)
    np.testing.assert_allclose(apply(explicit), apply(block), rtol=1e-6)


def test_transformer_block_without_cond_dropout_and_bf16():
  x = _x((2, 4, 4, 8))
  block = TransformerBlock(num_heads=2, dropout_rate=0.5)
  variables = block.init(KEY, x, deterministic=True)
  out = block.apply(variables, x, deterministic=True)
  assert out.shape == x.shape and float(jnp.abs(out - x).max()) > 1e-3
  train = jax.jit(lambda rng: block.apply(variables, x, deterministic=False,
                                          rngs={"dropout": rng}))
  a, b = train(jax.random.PRNGKey(1)), train(jax.random.PRNGKey(2))
  assert float(jnp.abs(a - b).max()) > 1e-3
  bf = TransformerBlock(num_heads=2, dtype=jnp.bfloat16)
  out = jax.jit(lambda v, x: bf.apply(v, x, deterministic=True))(variables, x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16


def test_transformer_block_does_not_shift_a_window_that_spans_the_grid():
  # Shifting a window as wide as the grid would only split it at the roll
  # border (see the functional check below), so the block must not shift.
  x, cond = _x((2, 4, 4, 8)), _x((2, 6), seed=3)
  kwargs = dict(num_heads=2, mlp_ratio=2, window_size=4)
  unshifted = TransformerBlock(attention="window", **kwargs)
  variables = unshifted.init(KEY, x, cond, deterministic=True)
  # Move the adaLN gates off zero so the attention branch reaches the output.
  variables = jax.tree_util.tree_map(lambda p: p + 0.1, variables)
  want = unshifted.apply(variables, x, cond, deterministic=True)
  for block in (TransformerBlock(attention="window_shifted", **kwargs),
                TransformerBlock(attention="window_shifted", shift=2, **kwargs),
                TransformerBlock(attention="window", shift=(2, 2), **kwargs)):
    np.testing.assert_array_equal(block.apply(variables, x, cond, deterministic=True), want)
  q, k, v = (_x((2, 4, 4, 2, 4), seed=s) for s in (4, 5, 6))
  assert not np.allclose(window_attention(q, k, v, window_size=4, shift=2),
                         window_attention(q, k, v, window_size=4), atol=1e-3)


def test_transformer_block_shift_guard_is_per_axis():
  # Grid 4 x 8, window 4: axis 0 is spanned (no shift), axis 1 still shifts by 2.
  x, cond = _x((2, 4, 8, 8)), _x((2, 6), seed=3)
  kwargs = dict(num_heads=2, mlp_ratio=2, window_size=4)
  block = TransformerBlock(attention="window_shifted", **kwargs)
  variables = jax.tree_util.tree_map(lambda p: p + 0.1,
                                     block.init(KEY, x, cond, deterministic=True))
  explicit = TransformerBlock(attention="window", shift=(0, 2), **kwargs)
  np.testing.assert_array_equal(block.apply(variables, x, cond, deterministic=True),
                                explicit.apply(variables, x, cond, deterministic=True))
  unshifted = TransformerBlock(attention="window", **kwargs)
  assert not np.allclose(block.apply(variables, x, cond, deterministic=True),
                         unshifted.apply(variables, x, cond, deterministic=True), atol=1e-3)
