"""The hourglass backbone (models/hourglass.py): token merge / split against a
brute-force reference, the whole network against a hand composition of its
levels, skips and conditions that change the output, 2D / 3D shapes, and the
quick flow config with the hourglass training a few steps."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import phantom_flow_hdit
from conftest import INFO, flow_shapes, perturbed, tiny_batch
from medgen_jax import models
from medgen_jax.data.info import ConditionField, DatasetInfo, IntensityTransform
from medgen_jax.models import hourglass as hg
from medgen_jax.models.layers import pixel_shuffle, space_to_depth
from medgen_jax.train import loop, state as state_lib

INFO_3D = DatasetInfo(
    name="synthetic3d", image_shape=(4, 8, 8, 1), modalities=("ct",),
    intensity=(IntensityTransform("ct", "HU", -1000.0, 1000.0),),
    conditions=(ConditionField("lesion", "categorical", 3, ("none", "small", "large")),
                ConditionField("age", "continuous", value_range=(20.0, 90.0))))


def unshuffle_reference(x: np.ndarray, f: int) -> np.ndarray:
  """Space-to-depth by loops: out[b, *i, (a_1..a_n) * C + c] = x[b, *(i * f + a), c]."""
  b, *spatial, c = x.shape
  ndim = len(spatial)
  out = np.zeros((b, *(s // f for s in spatial), c * f ** ndim), x.dtype)
  for idx in np.ndindex(*spatial):
    coarse = tuple(i // f for i in idx)
    block = 0
    for i in idx:  # offsets within the patch, first axis most significant
      block = block * f + i % f
    out[(slice(None), *coarse, slice(block * c, (block + 1) * c))] = x[(slice(None), *idx)]
  return out


@pytest.mark.parametrize("shape,factor", [((2, 4, 6, 3), 2), ((1, 4, 8, 4, 2), 2),
                                          ((1, 6, 6, 1), 3)])
def test_token_merge_and_split_are_inverse_and_match_a_brute_force_reference(shape, factor):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  merged = space_to_depth(jnp.asarray(x), factor)
  np.testing.assert_array_equal(merged, unshuffle_reference(x, factor))
  np.testing.assert_array_equal(pixel_shuffle(merged, factor), x)
  y = np.random.default_rng(1).normal(size=merged.shape).astype(np.float32)
  np.testing.assert_array_equal(space_to_depth(pixel_shuffle(jnp.asarray(y), factor), factor), y)


def reference_forward(spec, out_channels, params, x, style, *, skip_scale=1.0):
  """The hourglass applied level by level from its sub-modules and `params`."""
  last = spec.num_levels - 1
  level = lambda i, depth, name, h: hg.Level(
      depth, spec.widths[i] // spec.head_dim, spec.level_attention(i), spec.window_size,
      spec.mlp_ratio, spec.qk_norm).apply({"params": params[name]}, h, style, train=False)
  h = hg.PatchEmbed(spec.widths[0], spec.patch).apply({"params": params["patch_embed"]}, x)
  skips = []
  for i in range(last):
    h = level(i, spec.depths[i], f"down_{i}", h)
    skips.append(h * skip_scale)
    h = hg.TokenMerge(spec.widths[i + 1]).apply({"params": params[f"merge_{i}"]}, h)
  pos = params["middle_position"]["embedding"]
  h = level(last, spec.depths[last], "middle", h + pos[None])
  for i in reversed(range(last)):
    h = hg.TokenSplit(spec.widths[i]).apply({"params": params[f"split_{i}"]}, h)
    h = hg.SkipMerge(spec.skip).apply({"params": params[f"skip_{i}"]}, h, skips[i])
    h = level(i, spec.depths[i], f"up_{i}", h)
  return hg.Head(out_channels, spec.patch).apply({"params": params["head"]}, h, style)


SPEC_2D = hg.HourglassSpec(widths=(8, 16, 16), depths=(2, 1, 1), patch=2, head_dim=8,
                           attention="window_shifted", window_size=2)


@pytest.mark.parametrize("spec,shape", [
    (SPEC_2D, (2, 16, 16, 1)),
    pytest.param(dataclasses.replace(SPEC_2D, skip="lerp", attention="axial"), (2, 16, 16, 1),
                 marks=pytest.mark.slow),
    (hg.HourglassSpec(widths=(8, 16), depths=(1, 1), patch=1, head_dim=8, window_size=2),
     (1, 4, 4, 4, 2))])
def test_hourglass_is_the_composition_of_its_levels_and_uses_its_skips(spec, shape):
  net = hg.Hourglass(spec, out_channels=shape[-1])
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  style = jax.random.normal(jax.random.PRNGKey(2), (shape[0], 6))
  init = jax.jit(lambda: net.init(jax.random.PRNGKey(0), x, style, train=False))
  params = perturbed(init()["params"])
  forward = jax.jit(lambda p, s: net.apply({"params": p}, x, s, train=False))
  reference = jax.jit(lambda p, scale: reference_forward(spec, shape[-1], p, x, style,
                                                         skip_scale=scale))
  want = forward(params, style)
  assert want.shape == shape and want.dtype == jnp.float32
  np.testing.assert_allclose(reference(params, 1.0), want, rtol=1e-5, atol=1e-5)
  no_skips = reference(params, 0.0)
  assert float(jnp.abs(no_skips - want).mean()) > 1e-3 * float(jnp.abs(want).mean())
  # The style (time and condition) reaches the output.
  other = forward(params, style + 1.0)
  assert float(jnp.abs(other - want).max()) > 1e-3


def test_fresh_head_outputs_zero():
  head = hg.Head(out_channels=2, patch=2)
  h, style = jnp.ones((1, 4, 4, 8)), jnp.ones((1, 4))
  out = head.apply(head.init(jax.random.PRNGKey(0), h, style), h, style)
  assert out.shape == (1, 8, 8, 2)
  np.testing.assert_array_equal(out, 0.0)


@pytest.mark.slow
def test_fresh_hourglass_predicts_zero():
  net = hg.Hourglass(SPEC_2D, out_channels=1)
  x = jnp.ones((1, 16, 16, 1))
  variables = jax.jit(lambda: net.init(jax.random.PRNGKey(0), x, jnp.ones((1, 4)),
                                      train=False))()
  out = jax.jit(lambda v: net.apply(v, x, jnp.ones((1, 4)), train=False))(variables)
  np.testing.assert_array_equal(out, 0.0)


def hdit_config(info):
  config = phantom_flow_hdit.get_config("quick")
  config.model.latent_dim = int(np.prod(info.image_shape))
  return config


@pytest.mark.parametrize("info", [INFO, INFO_3D])
def test_flow_velocity_and_sampler_shapes_2d_and_3d(info):
  g = models.build_generator(hdit_config(info).model, info)
  n = 2
  variables, v, images = flow_shapes(g, info, n)
  assert v.shape == images.shape == (n,) + info.image_shape
  assert set(variables["params"]) == {"condition_embedding", "mapping", "hourglass"}


def test_conditions_change_the_hourglass_velocity():
  g = models.build_generator(hdit_config(INFO).model, INFO)
  x = jax.random.normal(jax.random.PRNGKey(0), (3,) + INFO.image_shape)
  t = jnp.full((3,), 0.5)
  cond = {"lesion": jnp.array([0, 1, 2])}
  params = perturbed(jax.jit(lambda: g.init(jax.random.PRNGKey(0), x, t, cond, train=False,
                                            method="velocity"))()["params"])
  v = jax.jit(lambda c: g.apply({"params": params}, x, t, c, train=False, method="velocity"))
  base = v(cond)
  for changed in ({"lesion": jnp.array([2, 0, 1])}, {"lesion": jnp.array([-1, -1, -1])}):
    diff = jnp.abs(v(changed) - base).reshape(3, -1).max(axis=1)
    assert bool(jnp.all(diff > 1e-4)), diff


def test_bad_hourglass_configs_fail_before_tracing():
  for update, match in [(dict(widths=(16,)), "one entry per level"),
                        (dict(patch=3), "divisible"), (dict(head_dim=5), "head_dim"),
                        (dict(skip="add"), "skip")]:
    config = hdit_config(INFO)
    config.model.hourglass.update(update)
    with pytest.raises(ValueError, match=match):
      models.build_generator(config.model, INFO)
  config = hdit_config(INFO)
  config.model.backbone = "unet"
  with pytest.raises(ValueError, match="backbone"):
    models.build_generator(config.model, INFO)


@pytest.mark.slow  # a real flow compilation (~13 s); tests/test_flow_train.py runs the loop
def test_quick_hdit_flow_config_trains_a_few_steps():
  config = hdit_config(INFO)
  config.train.batch_size = 8
  g = models.build_generator(config.model, INFO)
  m = state_lib.make_models(g, None, config)
  trainer = loop.make_trainer(config, m, INFO, devices=jax.devices()[:1])
  state = trainer.init_state()
  initial = jax.device_get(trainer.get_state(state)).g_params
  losses = []
  for i in range(3):
    state, metrics = trainer.step(state, trainer.put_batch(tiny_batch(i)), with_r1=False)
    losses.append(float(metrics["flow_loss"]))
  assert np.all(np.isfinite(losses)) and min(losses) > 0, losses
  final = jax.device_get(trainer.get_state(state)).g_params
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), final, initial)
  assert max(jax.tree.leaves(moved["hourglass"])) > 0
