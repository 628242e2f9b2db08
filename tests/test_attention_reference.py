"""Every attention variant against brute-force dense attention with an explicit mask.

The masks here are built by looping over token coordinates and stating, from
the definition, which keys each query may see; they share no code with the
library (no reshapes into windows, no rolls).
"""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.attention import (ATTENTION_VARIANTS, axial_attention, full_attention,
                                  window_attention)


def dense_reference(q, k, v, allowed, bias=None):
  """Softmax attention over flattened tokens.

  q, k, v: [B, *spatial, h, d]; allowed: bool [N, N] (query, key); bias: [h, N, N].
  """
  b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
  flat = lambda x: x.reshape(b, -1, h, d).astype(jnp.float32)
  logits = jnp.einsum("bnhd,bmhd->bhnm", flat(q), flat(k)) / math.sqrt(d)
  if bias is not None:
    logits = logits + bias[None]
  logits = jnp.where(jnp.asarray(allowed)[None, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhnm,bmhd->bnhd", probs, flat(v)).reshape(q.shape)


def coords(spatial):
  return list(itertools.product(*[range(s) for s in spatial]))


def axial_mask(spatial, axis):
  cs = coords(spatial)
  n = len(cs)
  allowed = np.zeros((n, n), bool)
  for i, p in enumerate(cs):
    for j, r in enumerate(cs):
      allowed[i, j] = all(p[a] == r[a] for a in range(len(spatial)) if a != axis)
  return allowed


def window_mask_and_local(spatial, window, shift):
  """Swin visibility from first principles, and each token's index inside its window.

  Rolling by -s moves coordinate p to (p - s) mod L; windows tile the rolled grid.
  The roll glues the tokens p < s (wrapped round) next to tokens p >= s: those
  two groups must not see each other even inside one window.
  """
  cs = coords(spatial)
  n = len(cs)
  rolled = lambda p: tuple((p[a] - shift[a]) % spatial[a] for a in range(len(spatial)))
  allowed = np.zeros((n, n), bool)
  local = np.zeros(n, int)
  for i, p in enumerate(cs):
    rp = rolled(p)
    offs = [rp[a] % window[a] for a in range(len(spatial))]
    local[i] = np.ravel_multi_index(offs, window)
    for j, r in enumerate(cs):
      rr = rolled(r)
      same_window = all(rp[a] // window[a] == rr[a] // window[a] for a in range(len(spatial)))
      same_side = all((p[a] < shift[a]) == (r[a] < shift[a]) for a in range(len(spatial)))
      allowed[i, j] = same_window and same_side
  return allowed, local


def random_qkv(shape, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v, r = (jax.random.normal(key, shape, dtype) for key in ks)
  return q, k, v, r


def assert_values_and_grads(fn, ref, args, rtol=1e-5, atol=1e-5):
  """Compares outputs and grads of sum(out * r) w.r.t. every arg (one jit per side)."""
  shape = jax.eval_shape(fn, *args).shape
  r = jax.random.normal(jax.random.PRNGKey(99), shape)
  argnums = tuple(range(len(args)))

  def value_and_grads(f):
    def loss(*a):
      out = f(*a)
      return jnp.sum(out * r), out
    return jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(*args)

  (_, got), got_grads = value_and_grads(fn)
  (_, want), want_grads = value_and_grads(ref)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


SPATIAL = [(4, 6), (2, 4, 3)]


def test_full_attention_over_flattened_grid(spatial=(2, 4, 3)):
  q, k, v, _ = random_qkv((2,) + spatial + (2, 4))
  n = math.prod(spatial)
  fn = lambda q, k, v: ATTENTION_VARIANTS["full"].fn(q, k, v)
  ref = lambda q, k, v: dense_reference(q, k, v, np.ones((n, n), bool))
  assert_values_and_grads(fn, ref, (q, k, v))


@pytest.mark.parametrize("implementation", [None, "chunked"])
@pytest.mark.parametrize("spatial", SPATIAL)
def test_axial_attention_each_axis(spatial, implementation):
  q, k, v, _ = random_qkv((2,) + spatial + (2, 4), seed=1)
  for axis in range(len(spatial)):
    fn = lambda q, k, v: axial_attention(q, k, v, axis=axis, implementation=implementation)
    ref = lambda q, k, v: dense_reference(q, k, v, axial_mask(spatial, axis))
    assert_values_and_grads(fn, ref, (q, k, v))
  # Negative axes count from the last spatial axis.
  np.testing.assert_allclose(axial_attention(q, k, v, axis=-1),
                             dense_reference(q, k, v, axial_mask(spatial, len(spatial) - 1)),
                             atol=1e-5)


def test_axial_variant_sums_axes():
  spatial = (3, 4)
  q, k, v, _ = random_qkv((1,) + spatial + (2, 4), seed=2)
  want = sum(dense_reference(q, k, v, axial_mask(spatial, a)) for a in range(2))
  np.testing.assert_allclose(ATTENTION_VARIANTS["axial"].fn(q, k, v), want, atol=1e-5)


WINDOW_CASES = [  # spatial, window, shift, with_bias
    ((8, 8), (4, 4), (2, 2), True),
    ((4, 8), (2, 4), (1, 3), False),
    ((4, 4, 4), (2, 2, 2), (1, 1, 1), False),
    ((2, 4, 6), (2, 2, 3), (0, 1, 2), True),
]


@pytest.mark.parametrize("implementation", [None, "chunked"])
@pytest.mark.parametrize("spatial,window,shift,with_bias", WINDOW_CASES)
def test_window_attention_matches_brute_force(spatial, window, shift, with_bias,
                                              implementation):
  q, k, v, _ = random_qkv((2,) + spatial + (2, 4), seed=3)
  allowed, local = window_mask_and_local(spatial, window, shift)
  t = math.prod(window)
  attend = functools.partial(window_attention, window_size=window, shift=shift,
                             implementation=implementation)
  if not with_bias:
    ref = lambda q, k, v: dense_reference(q, k, v, allowed)
    assert_values_and_grads(attend, ref, (q, k, v))
    return
  bias = jax.random.normal(jax.random.PRNGKey(7), (2, t, t))
  fn = lambda q, k, v, b: attend(q, k, v, bias=b)
  ref = lambda q, k, v, b: dense_reference(q, k, v, allowed, b[:, local][:, :, local])
  assert_values_and_grads(fn, ref, (q, k, v, bias))


def test_window_variants_in_registry():
  spatial, window = (8, 8), (4, 4)
  q, k, v, _ = random_qkv((1,) + spatial + (2, 4), seed=4)
  plain, _ = window_mask_and_local(spatial, window, (0, 0))
  shifted, _ = window_mask_and_local(spatial, window, (2, 2))
  np.testing.assert_allclose(ATTENTION_VARIANTS["window"].fn(q, k, v, window_size=4),
                             dense_reference(q, k, v, plain), atol=1e-5)
  np.testing.assert_allclose(ATTENTION_VARIANTS["window_shifted"].fn(q, k, v, window_size=4),
                             dense_reference(q, k, v, shifted), atol=1e-5)


def test_shifted_mask_actually_restricts():
  """Guards the reference itself: the shift must cut some window pairs apart."""
  plain, _ = window_mask_and_local((8, 8), (4, 4), (0, 0))
  shifted, _ = window_mask_and_local((8, 8), (4, 4), (2, 2))
  assert plain.sum() == 64 * 16
  assert shifted.sum() < plain.sum()
  assert (shifted == shifted.T).all()


def test_full_attention_cross_with_bias_and_mask():
  q, _, _, _ = random_qkv((2, 5, 2, 4), seed=5)
  _, k, v, _ = random_qkv((2, 7, 2, 4), seed=6)
  bias = jax.random.normal(jax.random.PRNGKey(8), (2, 5, 7))
  allowed = np.random.default_rng(0).random((5, 7)) > 0.4
  allowed[:, 0] = True

  def ref(q, k, v, b):
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) / 2.0 + b[None]
    probs = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhnm,bmhd->bnhd", probs, v)

  for chunk in (None, 3):
    fn = lambda q, k, v, b: full_attention(q, k, v, bias=b, mask=allowed, chunk_size=chunk)
    assert_values_and_grads(fn, ref, (q, k, v, bias))


def test_restricted_attention_forwards_the_forced_kernel():
  # The forced implementation reaches full_attention: cuDNN does not exist on
  # CPU, so forcing it must fail rather than quietly run the default.
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU's refusal of cuDNN")
  q, k, v, _ = random_qkv((1, 4, 4, 2, 8), dtype=jnp.bfloat16)
  with pytest.raises(Exception):
    jax.block_until_ready(axial_attention(q, k, v, axis=0, implementation="cudnn"))
  with pytest.raises(Exception):
    jax.block_until_ready(window_attention(q, k, v, window_size=2, implementation="cudnn"))
  with pytest.raises(ValueError, match="implementation must be"):
    window_attention(q, k, v, window_size=2, implementation="flash")
