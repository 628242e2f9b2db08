"""The attention registry: each entry's traits agree with what its function does,
names and windows fail with one clear error, and a new entry drives the quick GAN generator."""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import phantom_gan
from conftest import perturbed
from medgen_jax import attention
from medgen_jax.attention import (ATTENTION_VARIANTS, AttentionVariant, MultiHeadAttention,
                                  check_window, get_attention, register_attention, registry)
from medgen_jax.data import pipeline
from medgen_jax.models import build_generator
from medgen_jax.train import state as state_lib
from medgen_jax.train import validate_config

TOY = "toy_dot_product"
BUILT_IN = ("full", "axial", "window", "window_shifted")


def _qkv(shape, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(key, shape) for key in keys)


def _toy_attention(calls, q, k, v, *, window_size=None, shift=None, bias=None,
                   chunk_size=None):
  """softmax(q k^T / sqrt(d)) v over the flattened grid, written out with jnp."""
  del window_size, shift, bias, chunk_size
  calls.append(q.shape)  # once per trace: proves the model ran this function
  b, heads, dim = q.shape[0], q.shape[-2], q.shape[-1]
  flat = lambda x: x.reshape(b, -1, heads, dim).astype(jnp.float32)
  logits = jnp.einsum("bqhd,bkhd->bhqk", flat(q), flat(k)) / math.sqrt(dim)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, flat(v)).reshape(q.shape).astype(q.dtype)


@pytest.fixture
def toy():
  """Registers the toy variant for one test; yields the list its traces append to."""
  calls = []
  register_attention(TOY, AttentionVariant(functools.partial(_toy_attention, calls),
                                           flat=True))
  try:
    yield calls
  finally:
    del ATTENTION_VARIANTS[TOY]


def test_registry_holds_the_built_in_variants():
  assert tuple(ATTENTION_VARIANTS) == BUILT_IN
  assert all(isinstance(v, AttentionVariant) for v in ATTENTION_VARIANTS.values())


def test_unknown_name_is_one_error_listing_the_valid_names():
  valid = "['axial', 'full', 'window', 'window_shifted']"
  with pytest.raises(ValueError, match=re.escape(f"unknown attention 'flash'; valid names "
                                                 f"are {valid}")):
    get_attention("flash")
  x = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match=re.escape(valid)):
    MultiHeadAttention(2, attention="flash").init(jax.random.PRNGKey(0), x,
                                                  deterministic=True)
  config = phantom_gan.get_config("quick")
  config.model.attention = "flash"
  with pytest.raises(ValueError, match=re.escape(f"unknown model.attention 'flash'; valid "
                                                 f"names are {valid}")):
    validate_config(config, 1)


def test_registering_a_taken_name_or_a_bare_function_fails():
  with pytest.raises(ValueError, match="'full' is already registered"):
    register_attention("full", ATTENTION_VARIANTS["full"])
  with pytest.raises(TypeError, match="needs an AttentionVariant"):
    register_attention("bare", ATTENTION_VARIANTS["full"].fn)
  assert "bare" not in ATTENTION_VARIANTS


@pytest.mark.parametrize("name", BUILT_IN)
def test_window_that_does_not_tile_the_grid_is_one_error(name):
  fits = not get_attention(name).windowed
  for window in (8, 3, 0):
    if fits:  # a variant without windows ignores window_size
      check_window(name, window, (4, 4))
      continue
    with pytest.raises(ValueError, match=f"attention={name!r}: window_size={window} must"):
      check_window(name, window, (4, 4))
  check_window(name, 2, (4, 4))
  check_window(name, (2, 4), (4, 4))


@pytest.mark.parametrize("name", BUILT_IN)
def test_windowed_trait_matches_the_function(name):
  # Windowed: equals window_attention over 4x4 windows; otherwise window_size
  # changes nothing.
  q, k, v = _qkv((1, 8, 8, 2, 4))
  fn, variant = ATTENTION_VARIANTS[name].fn, ATTENTION_VARIANTS[name]
  if variant.windowed:
    want = attention.window_attention(q, k, v, window_size=4, shift=0)
    np.testing.assert_allclose(fn(q, k, v, window_size=4, shift=0), want, atol=1e-5)
  else:
    np.testing.assert_allclose(fn(q, k, v, window_size=2), fn(q, k, v, window_size=4),
                               atol=1e-6)


@pytest.mark.parametrize("name", [n for n in BUILT_IN if get_attention(n).windowed])
def test_shifted_trait_is_the_default_shift(name):
  q, k, v = _qkv((1, 8, 8, 2, 4))
  fn = ATTENTION_VARIANTS[name].fn
  want_shift = 2 if get_attention(name).shifted else 0
  np.testing.assert_allclose(fn(q, k, v, window_size=4),
                             fn(q, k, v, window_size=4, shift=want_shift), atol=1e-6)
  assert registry.block_shift(name, 4, (8, 8), block=1) == want_shift
  assert registry.block_shift(name, 4, (8, 8), block=0) == 0
  assert registry.block_shift(name, 8, (8, 8), block=1) == 0  # window covers the grid


@pytest.mark.parametrize("name", BUILT_IN)
def test_accepts_bias_trait_decides_the_learned_bias(name):
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 8))
  params = MultiHeadAttention(2, attention=name, window_size=2).init(
      jax.random.PRNGKey(1), x, deterministic=True)["params"]
  assert ("relative_bias" in params) == get_attention(name).accepts_bias
  if get_attention(name).accepts_bias:
    q, k, v = _qkv((1, 4, 4, 2, 4))
    bias = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4))
    fn = ATTENTION_VARIANTS[name].fn
    assert not np.allclose(fn(q, k, v, window_size=2, bias=bias), fn(q, k, v, window_size=2))


@pytest.mark.parametrize("name", BUILT_IN)
def test_flat_trait_takes_any_spatial_rank(name):
  q, k, v = _qkv((1, 16, 2, 4))  # one spatial axis
  if get_attention(name).flat:
    assert ATTENTION_VARIANTS[name].fn(q, k, v).shape == q.shape
  else:
    with pytest.raises(ValueError, match="2 or 3 spatial dims"):
      ATTENTION_VARIANTS[name].fn(q, k, v, window_size=4)


@pytest.mark.parametrize("name", BUILT_IN)
def test_sums_axes_trait_is_the_weight_mass(name):
  # Values of ones: an attention gives ones; a sum over axes gives their count.
  q, k, _ = _qkv((1, 4, 4, 2, 4))
  out = ATTENTION_VARIANTS[name].fn(q, k, jnp.ones_like(q), window_size=2)
  mass = 2 if get_attention(name).sums_axes else 1
  np.testing.assert_allclose(out, mass * np.ones(out.shape), atol=1e-5)


def test_sequence_parallel_trait_is_what_the_trainer_accepts():
  assert registry.sequence_parallel_names() == tuple(
      n for n in BUILT_IN if get_attention(n).sequence_parallel is not None)
  for name in BUILT_IN:
    if get_attention(name).sequence_parallel is None:
      with pytest.raises(ValueError, match=f"{name!r} has no sequence-parallel form"):
        registry.sequence_parallel_form(name)
    else:
      assert registry.sequence_parallel_form(name) is get_attention(name).sequence_parallel


def test_toy_variant_matches_full_attention_in_a_layer(toy):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  full = MultiHeadAttention(2, attention="full")
  params = full.init(jax.random.PRNGKey(1), x, deterministic=True)
  out = MultiHeadAttention(2, attention=TOY).apply(params, x, deterministic=True)
  np.testing.assert_allclose(out, full.apply(params, x, deterministic=True), atol=1e-5)
  assert toy and toy[0] == (2, 4, 4, 2, 4)
  with pytest.raises(ValueError, match=f"{TOY!r} has no sequence-parallel form"):
    registry.sequence_parallel_form(TOY)


def test_quick_gan_generator_runs_a_registered_toy_variant_as_full(toy, tmp_path):
  """The config path the trainer takes (validate_config, build_generator) runs the
  toy function; as exact dot-product attention it gives the `full` variant's
  images for the same parameters."""
  config = phantom_gan.get_config("quick")
  config.data.data_dir = str(tmp_path / "tfds")
  config.model.attention = TOY
  validate_config(config, 1)
  info = pipeline.load_info(config.data)
  toy_g = build_generator(config.model, info)
  config.model.attention = "full"
  full_g = build_generator(config.model, info)
  z = jax.random.normal(jax.random.PRNGKey(0), (2, config.model.latent_dim))
  conditions = state_lib.dummy_conditions(info, 2)
  params = full_g.init(jax.random.PRNGKey(1), z, conditions, train=False)
  # Zero-initialised gates and projections hide attention at init: perturb
  # every parameter so the attention output reaches the image.
  params = perturbed(params, scale=0.1, seed=2)

  images = lambda g: jax.jit(lambda p: g.apply(p, z, conditions, train=False))(params)
  toy_images = images(toy_g)
  assert len(toy) >= config.model.attention_stages  # every stage traced the toy
  full_images = images(full_g)
  assert float(jnp.std(full_images)) > 1e-3  # not a constant image
  np.testing.assert_allclose(toy_images, full_images, atol=1e-5)
