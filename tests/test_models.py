"""Generators and discriminator: output contract, conditioning, projection, errors."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from medgen_jax import models
from medgen_jax.data.info import ConditionField, DatasetInfo, IntensityTransform
from medgen_jax.models import layers, shapes

CONDITIONS = (ConditionField("lesion", "categorical", 3),
              ConditionField("age", "continuous", value_range=(20.0, 90.0)))


def _info(shape=(16, 16, 1), conditions=CONDITIONS) -> DatasetInfo:
  channels = shape[-1]
  return DatasetInfo("test", tuple(shape), ("ct",) * channels,
                     (IntensityTransform("ct", "HU", -1000.0, 1000.0),) * channels,
                     conditions=conditions)


def _config(**overrides) -> ConfigDict:
  config = ConfigDict(dict(
      generator="transformer", variant="Ti", latent_dim=8, token_grid=4,
      attention="window_shifted", window_size=2, attention_stages=2,
      mlp_ratio=2, cond_dim=16, cond_dropout=0.1, qk_norm=True,
      chunk_size=None, position_encoding="learned", discriminator="resnet", d_width=8,
      spectral_norm=True, d_minibatch_std=0, d_condition_heads=False, d_blocks_per_stage=1,
      d_expansion=1, d_group_size=16, dtype="float32"))
  config.update(overrides)
  return config


def _conditions(batch: int, lesion=(0, 2, -1, 1), age=(30.0, np.nan, 70.0, 50.0)):
  return {"lesion": jnp.asarray(lesion[:batch], jnp.int32),
          "age": jnp.asarray(age[:batch], jnp.float32)}


def _perturb(params, rng, scale=0.3):
  """Moves every parameter off its (possibly zero) init so gates are open.

  Host-side numpy noise seeded from `rng`: drawing it with jax.random leaf
  by leaf compiled one sampler per parameter shape (most of these tests' time).
  """
  seed = int(np.asarray(jax.random.key_data(rng)).ravel()[-1])
  noise = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: p + scale * noise.standard_normal(p.shape).astype(p.dtype), params)


def projection_reference(params, h, *, lesion, age):
  """Hand-computed projection logits from D's params and features h `[B, F]`:
  w.h + b + <E[lesion], h> (lesion known) + c(age) <v, h> (age known), with
  c the age rescaled from [20, 90] to [-1, 1] (the test info's range)."""
  get = lambda layer, name: np.asarray(params[layer][name], np.float64)
  table, w_age = get("embed_lesion", "embedding"), get("project_age", "kernel")[:, 0]
  ref = h @ get("linear", "kernel")[:, 0] + get("linear", "bias")[0]
  for i in range(len(h)):
    if lesion[i] >= 0:
      ref[i] += table[lesion[i]] @ h[i]
    if not np.isnan(age[i]):
      ref[i] += ((age[i] - 20.0) / 70.0 * 2 - 1) * (w_age @ h[i])
  return ref


def _init(model, rng, *args, **kwargs):
  """model.init under one jit (eager init compiles every initializer separately)."""
  return jax.jit(lambda key, *a: model.init(key, *a, **kwargs))(rng, *args)


# The default suite keeps the default attention (window_shifted), the CNN
# baseline and 3D; the other attention choices are checked against brute
# force in tests/test_attention_reference.py and under jit/grad/bf16 in
# tests/test_attention_layers.py, so their generator contract cases run with
# -m slow only (the default suite must stay under CI's 15 minutes).
_slow = pytest.mark.slow
CASES = [pytest.param("transformer", a, (16, 16, 1), marks=_slow)
         for a in ("full", "axial", "window")]
CASES += [("transformer", "window_shifted", (16, 16, 1)), ("cnn", "full", (16, 16, 1)),
          ("transformer", "axial", (8, 8, 8, 1))]


@pytest.mark.parametrize("generator,attention,shape", CASES)
def test_generator_contract_and_conditioning(generator, attention, shape):
  info = _info(shape)
  config = _config(generator=generator, attention=attention)
  model = models.build_generator(config, info)
  z = jax.random.normal(jax.random.PRNGKey(0), (3, config.latent_dim))
  cond = _conditions(3)
  params = _init(model, jax.random.PRNGKey(1), z, cond, train=False)["params"]
  params = _perturb(params, jax.random.PRNGKey(2))
  # Same z, another lesion class (and an unknown one) in the second half:
  # one compiled call for both.
  other = {**cond, "lesion": jnp.array([1, 0, 2], jnp.int32)}
  both = {k: jnp.concatenate([cond[k], other[k]]) for k in cond}
  out = jax.jit(lambda p: model.apply({"params": p}, jnp.concatenate([z, z]), both,
                                      train=False))(params)
  assert out.shape == (6, *shape)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and np.all(np.abs(out) <= 1.0)
  diff = np.abs(np.asarray(out[:3]) - np.asarray(out[3:])).reshape(3, -1).max(axis=1)
  assert np.all(diff > 1e-4), diff


def test_window_shifted_alternates_shift():
  """Swin order: blocks alternate shift 0 and window // 2 within a stage."""
  from medgen_jax.attention import TransformerBlock
  info = _info((32, 32, 1))
  config = _config(attention="window_shifted", variant="S", token_grid=8,
                   window_size=4, attention_stages=1)
  model = models.build_generator(config, info)
  z = jnp.ones((1, 8))
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, TransformerBlock) and context.method_name == "__call__":
      seen.append((context.module.name, context.module.attention, context.module.shift))
    return next_fun(*args, **kwargs)

  with flax.linen.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), z, _conditions(1), train=False))
  assert seen == [("block_0_0", "window_shifted", 0), ("block_0_1", "window_shifted", 2)]


@pytest.mark.slow  # a bf16 gradient of the whole generator (~10 s); tests/test_mixed_precision.py keeps bf16
def test_generator_gradient_reaches_condition_and_bf16():
  info = _info()
  model = models.build_generator(_config(dtype="bfloat16"), info)
  z = jnp.ones((2, 8))
  cond = _conditions(2)
  params = _init(model, jax.random.PRNGKey(0), z, cond, train=False)["params"]
  # Params stay float32 under bf16 compute.
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  params = _perturb(params, jax.random.PRNGKey(1))

  @jax.jit
  def loss(p):
    out = model.apply({"params": p}, z, cond, train=True,
                      rngs={"dropout": jax.random.PRNGKey(2)})
    assert out.dtype == jnp.float32
    return jnp.mean(out ** 2)

  grads = jax.grad(loss)(params)
  flat = flax.traverse_util.flatten_dict(grads)
  lesion = [v for k, v in flat.items() if "embed_lesion" in k]
  assert lesion and float(jnp.abs(lesion[0]).sum()) > 0
  assert all(np.all(np.isfinite(v)) for v in flat.values())


def test_generator_without_conditions():
  info = _info(conditions=())
  model = models.build_generator(_config(), info)
  z = jnp.ones((2, 8))
  variables = _init(model, jax.random.PRNGKey(0), z, {}, train=False)
  out = jax.jit(lambda v: model.apply(v, z, {}, train=False))(variables)
  assert out.shape == (2, 16, 16, 1)


@pytest.mark.parametrize("shape", [(16, 16, 1), pytest.param((8, 8, 8, 2), marks=_slow)])
def test_discriminator_projection_by_hand(shape):
  info = _info(shape)
  model = models.build_discriminator(_config(spectral_norm=False), info)
  images = jax.random.uniform(jax.random.PRNGKey(0), (4, *shape), minval=-1, maxval=1)
  cond = _conditions(4)
  variables = _init(model, jax.random.PRNGKey(1), images, cond, train=False)
  params = _perturb(variables["params"], jax.random.PRNGKey(2), scale=0.1)
  variables = {"params": params}
  swapped_cond = {**cond, "lesion": jnp.array([1, 0, -1, 1])}

  @jax.jit
  def score(variables):
    logits, state = model.apply(variables, images, cond, train=False,
                                mutable=["intermediates"])
    swapped = model.apply(variables, images, swapped_cond, train=False)
    return logits, state["intermediates"]["features"][0], swapped

  logits, h, swapped = score(variables)
  assert logits.shape == (4,) and logits.dtype == jnp.float32
  h = np.asarray(h, np.float64)
  table = np.asarray(params["embed_lesion"]["embedding"], np.float64)
  ref = projection_reference(params, h, lesion=np.array([0, 2, -1, 1]),
                             age=np.array([30.0, np.nan, 70.0, 50.0]))
  np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
  # Changing only the class changes the logit by exactly <E[a] - E[b], h>.
  np.testing.assert_allclose(np.asarray(swapped) - np.asarray(logits),
                             [(table[1] - table[0]) @ h[0], (table[0] - table[2]) @ h[1], 0, 0],
                             rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # ~25 s of D compilation; the heads are off by default
def test_discriminator_condition_heads_by_hand():
  info = _info()
  model = models.build_discriminator(
      _config(spectral_norm=False, d_condition_heads=True), info)
  images = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 1), minval=-1, maxval=1)
  cond = _conditions(4)
  variables = _init(model, jax.random.PRNGKey(1), images, cond, train=False)
  params = _perturb(variables["params"], jax.random.PRNGKey(2), scale=0.1)
  @jax.jit  # one compilation for both calls
  def score(v):
    out = model.apply(v, images, cond, train=False, with_predictions=True,
                      mutable=["intermediates"])
    return out, model.apply(v, images, cond, train=False)

  ((logits, predictions), state), plain = score({"params": params})
  h = np.asarray(state["intermediates"]["features"][0], np.float64)
  dense = lambda name: (np.asarray(params[name]["kernel"], np.float64),
                        np.asarray(params[name]["bias"], np.float64))
  k, b = dense("predict_lesion")
  assert predictions["lesion"].shape == (4, 3)
  np.testing.assert_allclose(predictions["lesion"], h @ k + b, rtol=1e-4, atol=1e-4)
  k, b = dense("predict_age")
  np.testing.assert_allclose(predictions["age"], h @ k[:, 0] + b[0], rtol=1e-4, atol=1e-4)
  # The heads do not change the adversarial logit.
  np.testing.assert_allclose(plain, logits, rtol=1e-6)
  without = models.build_discriminator(_config(spectral_norm=False), info)
  with pytest.raises(ValueError, match="needs condition_heads=True"):
    jax.eval_shape(lambda: without.init(jax.random.PRNGKey(1), images, cond, train=False,
                                        with_predictions=True))


@pytest.mark.slow  # the whole ResNet D's gradient with its power-iteration state (~8 s)
def test_discriminator_spectral_norm_state_and_grad():
  info = _info()
  model = models.build_discriminator(_config(), info)
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 1))
  cond = _conditions(2)
  variables = _init(model, jax.random.PRNGKey(1), images, cond, train=False)
  assert "batch_stats" in variables

  @jax.jit
  def loss(params, stats):
    logits, new = model.apply({"params": params, "batch_stats": stats}, images, cond,
                              train=True, mutable=["batch_stats"])
    return jnp.mean(jax.nn.softplus(logits)), new

  (value, new), grads = jax.value_and_grad(loss, has_aux=True)(
      variables["params"], variables["batch_stats"])
  assert np.isfinite(value)
  old_u = jax.tree_util.tree_leaves(variables["batch_stats"])
  new_u = jax.tree_util.tree_leaves(new["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(old_u, new_u))
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  # Every conv kernel is normalised to spectral norm <= ~1 after power iteration:
  # sigma tracks the largest singular value of the flattened kernel.
  flat = flax.traverse_util.flatten_dict(new["batch_stats"])
  kernel = variables["params"]["DBlock_0"]["Conv_0"]["kernel"]
  sigma = [v for k, v in flat.items() if k[0] == "DBlock_0" and "Conv_0/kernel/sigma" in k[-1]]
  true = np.linalg.svd(np.asarray(kernel).reshape(-1, kernel.shape[-1]), compute_uv=False)[0]
  assert sigma and 0.2 * true <= float(sigma[0]) <= true * 1.0001


def test_pixel_shuffle_roundtrip_and_order():
  x = jnp.arange(2 * 2 * 3 * 8, dtype=jnp.float32).reshape(2, 2, 3, 8)
  y = layers.pixel_shuffle(x)
  assert y.shape == (2, 4, 6, 2)
  # Output (2i + a, 2j + b) takes channel block (a, b) of input (i, j).
  np.testing.assert_array_equal(y[1, 2 * 1 + 1, 2 * 2 + 0], x[1, 1, 2, 4:6])
  np.testing.assert_array_equal(layers.space_to_depth(y), x)
  v = jnp.arange(2 * 2 * 2 * 2 * 16.0).reshape(2, 2, 2, 2, 16)
  np.testing.assert_array_equal(layers.space_to_depth(layers.pixel_shuffle(v)), v)


def test_upsampling_plan():
  assert shapes.upsampling_plan((64, 64), 8) == ((8, 8), 3)
  assert shapes.upsampling_plan((32, 64, 64), 4) == ((4, 8, 8), 3)
  with pytest.raises(ValueError, match=r"\(48, 48\).*token_grid=8"):
    shapes.upsampling_plan((48, 48), 8)
  with pytest.raises(ValueError, match="not divisible"):
    shapes.upsampling_plan((16, 18), 4)


@pytest.mark.parametrize("overrides,match", [
    (dict(generator="gan9000"), "unknown generator 'gan9000'.*cnn.*transformer"),
    (dict(discriminator="vit"), "unknown discriminator 'vit'.*resnet"),
    (dict(attention="linear"), "unknown attention 'linear'"),
    (dict(variant="XL"), "unknown model variant 'XL'"),
    (dict(window_size=8), "window_size=8 must be <= and divide the token grid"),
    (dict(window_size=3), "window_size=3"),
    (dict(token_grid=3), r"image size \(16, 16\) is not token_grid=3"),
    (dict(attention_stages=5), "attention_stages=5"),
    (dict(dtype="float16"), "unknown model dtype"),
])
def test_bad_config_errors(overrides, match):
  config = _config(**overrides)
  with pytest.raises(ValueError, match=match):
    models.build_generator(config, _info())
    models.build_discriminator(config, _info())
