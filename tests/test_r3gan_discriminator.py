"""R3GAN discriminator: identity blocks at init, fix-up scale, grouped kernels,
projection conditioning by hand, config errors, and a quick training run."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import phantom_gan
from medgen_jax import models
from medgen_jax.models.r3gan_discriminator import GroupedConv, ResidualBlock, msr_init
from medgen_jax.train import train_and_evaluate
from test_models import _conditions, _config, _info, _init, _perturb, projection_reference


def _r3gan_config(**overrides):
  return _config(**{"discriminator": "r3gan", "d_width": 8, "d_expansion": 2,
                    "d_group_size": 8, **overrides})


def _pool(x: np.ndarray) -> np.ndarray:
  """2x average pooling of [B, *spatial, C] in numpy."""
  for axis in range(1, x.ndim - 1):
    x = x.reshape(*x.shape[:axis], x.shape[axis] // 2, 2, *x.shape[axis + 1:]).mean(axis + 1)
  return x


@pytest.mark.parametrize("shape, num_down", [((16, 16, 1), 2), ((8, 16, 16, 2), 1)])
def test_params_only_and_linear_at_init(shape, num_down):
  # Every residual branch ends in a zero conv, so at init D is the stem, the
  # pooled transitions, the basis and the feature map: a linear network that
  # numpy recomputes from the params alone.
  model = models.build_discriminator(_r3gan_config(), _info(shape))
  images = jax.random.uniform(jax.random.PRNGKey(0), (4, *shape), minval=-1, maxval=1)
  cond = _conditions(4)
  variables = _init(model, jax.random.PRNGKey(1), images, cond, train=False)
  assert list(variables) == ["params"]
  logits, state = jax.jit(lambda v: model.apply(
      v, images, cond, train=False, mutable=["intermediates"]))(variables)
  assert logits.shape == (4,) and logits.dtype == jnp.float32
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  # Downsampling until the smallest axis is 4: 16 -> 8 -> 4, or 8 -> 4 in 3D.
  assert sorted(k for k in p if k.startswith("transition_")) == [
      f"transition_{i}" for i in range(num_down)]
  x = np.asarray(images, np.float64) @ p["stem"]["kernel"]
  for i in range(num_down):
    x = _pool(x) @ p[f"transition_{i}"]["kernel"]
  assert min(x.shape[1:-1]) == 4 and x.shape[1:] == p["basis"].shape
  pooled = np.sum(x * p["basis"], axis=tuple(range(1, x.ndim - 1)))  # [B, C]
  features = pooled @ p["feature_map"]["kernel"]
  np.testing.assert_allclose(state["intermediates"]["features"][0], features,
                             rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(logits)) and np.ptp(np.asarray(logits)) > 0


def test_patchify_stem_and_head_shapes_at_64():
  model = models.build_discriminator(_r3gan_config(d_width=32, d_group_size=16),
                                     _info((64, 64, 1)))
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 1)), _conditions(2), train=False))
  p = shapes["params"]
  # 2x space-to-depth (4 channels), then stages at 32, 16, 8 and 4 of widths
  # 32, 64, 128 and 128 (the 4x cap: no last transition).
  assert p["stem"]["kernel"].shape == (4, 32)
  assert [p[f"transition_{i}"]["kernel"].shape for i in range(2)] == [(32, 64), (64, 128)]
  assert "transition_2" not in p and p["basis"].shape == (4, 4, 128)
  assert sum(1 for k in p if k.startswith("ResidualBlock_")) == 4


def test_bfloat16_compute_float32_params_and_logits():
  model = models.build_discriminator(_r3gan_config(dtype="bfloat16"), _info())
  images, cond = jnp.zeros((2, 16, 16, 1)), _conditions(2)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, cond,
                                                train=False))
  assert {a.dtype for a in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images, cond, train=False))(variables)
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
  assert jaxpr.out_avals[0].dtype == jnp.float32


def test_residual_block_is_identity_at_init_and_not_after():
  block = ResidualBlock(expansion=2, group_size=8, num_blocks=3, dense_groups=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 16))
  params = jax.jit(block.init)(jax.random.PRNGKey(1), x)["params"]
  assert not np.any(np.asarray(params["contract"]["kernel"]))
  np.testing.assert_array_equal(block.apply({"params": params}, x), x)
  moved = _perturb(params, jax.random.PRNGKey(2), scale=0.1)
  assert np.max(np.abs(np.asarray(block.apply({"params": moved}, x) - x))) > 1e-2


def test_grouped_conv_groups_and_dense_form():
  wide, group = 32, 8
  model = models.build_discriminator(_r3gan_config(d_expansion=4), _info())
  params = _init(model, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), _conditions(1),
                 train=False)["params"]
  # The stored kernel is a grouped conv's: in-channels per group, all outputs,
  # i.e. feature_group_count = wide / group_size.
  assert params["ResidualBlock_0"]["grouped"]["kernel"].shape == (3, 3, group, wide)
  assert params["ResidualBlock_0"]["expand"]["kernel"].shape == (8, wide)

  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, wide))
  dense = GroupedConv(group, msr_init(1.0), dense=True)
  native = GroupedConv(group, msr_init(1.0), dense=False)
  p = _perturb(dense.init(jax.random.PRNGKey(2), x), jax.random.PRNGKey(3))
  y = dense.apply(p, x)
  np.testing.assert_allclose(y, native.apply(p, x), rtol=1e-5, atol=1e-5)
  # Group 1's inputs reach group 1's outputs only.
  y2 = dense.apply(p, x.at[..., group:2 * group].add(1.0))
  changed = np.max(np.abs(np.asarray(y2 - y)), axis=(0, 1, 2)).reshape(wide // group, group)
  assert np.all(changed[1] > 1e-3)
  np.testing.assert_array_equal(np.delete(changed, 1, axis=0), 0.0)


def test_fixup_init_scale():
  # L = 3 blocks per stage x 2 stages (8x8 input: stages at 8 and 4).
  model = models.build_discriminator(
      _r3gan_config(d_width=32, d_group_size=16, d_blocks_per_stage=3), _info((8, 8, 1)))
  params = _init(model, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), _conditions(1),
                 train=False)["params"]
  blocks = [v for k, v in params.items() if k.startswith("ResidualBlock_")]
  assert len(blocks) == 6
  gain = math.sqrt(2 / (1 + 0.2 ** 2)) * 6 ** (-1 / (2 * 3 - 2))
  for name in ("expand", "grouped"):
    # Kernel entries times sqrt(fan_in) are N(0, gain^2) in every block.
    z = np.concatenate([
        np.asarray(b[name]["kernel"]).ravel()
        * math.sqrt(math.prod(b[name]["kernel"].shape[:-1])) for b in blocks])
    assert z.size > 20_000
    assert abs(z.std() / gain - 1) < 0.02, (name, z.std(), gain)
    assert abs(z.mean()) < 0.02 * gain
  # The transitions keep gain 1 (no activation follows them).
  t = np.asarray(params["transition_0"]["kernel"])
  assert abs(t.std() * math.sqrt(t.shape[0]) - 1) < 0.1


def test_projection_and_heads_by_hand():
  model = models.build_discriminator(_r3gan_config(d_condition_heads=True), _info())
  images = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 1), minval=-1, maxval=1)
  # Row 2: unknown lesion; row 1: unknown age; row 3: both unknown.
  lesion = np.array([0, 2, -1, -1])
  age = np.array([30.0, np.nan, 70.0, np.nan])
  cond = _conditions(4, lesion=lesion, age=age)
  variables = _init(model, jax.random.PRNGKey(1), images, cond, train=False)
  params = _perturb(variables["params"], jax.random.PRNGKey(2), scale=0.1)

  @jax.jit
  def score(params):
    return model.apply({"params": params}, images, cond, train=False,
                       with_predictions=True, mutable=["intermediates"])

  (logits, predictions), state = score(params)
  h = np.asarray(state["intermediates"]["features"][0], np.float64)
  get = lambda layer, name: np.asarray(params[layer][name], np.float64)
  w, b = get("linear", "kernel")[:, 0], get("linear", "bias")[0]
  ref = projection_reference(params, h, lesion=lesion, age=age)
  np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
  # Unknown conditions contribute nothing: row 3 is the unconditional logit.
  np.testing.assert_allclose(logits[3], h[3] @ w + b, rtol=1e-5, atol=1e-5)
  assert abs(ref[0] - (h[0] @ w + b)) > 1e-2  # known ones do
  np.testing.assert_allclose(predictions["lesion"],
                             h @ get("predict_lesion", "kernel") + get("predict_lesion", "bias"),
                             rtol=1e-4, atol=1e-4)
  assert predictions["age"].shape == (4,)


@pytest.mark.parametrize("overrides, match", [
    (dict(d_width=8, d_expansion=1, d_group_size=16), r"model\.d_group_size 16 .* = 8"),
    (dict(d_group_size=0), r"model\.d_group_size 0"),
    (dict(d_minibatch_std=4), r"model\.d_minibatch_std"),
])
def test_bad_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    models.build_discriminator(_r3gan_config(**overrides), _info())


@pytest.mark.slow  # a real GAN compilation (~35 s); the default suite trains one in test_attention_registry
def test_quick_config_trains(tmp_path):
  config = phantom_gan.get_config("quick")
  config.model.discriminator = "r3gan"
  config.data.data_dir = str(tmp_path / "tfds")
  # One compiled step (R1/R2 every step) and no condition teacher to train:
  # what is checked is the step with a D that has no 'batch_stats'.
  config.loss.update(r1_every=1, teacher_weight=0.0)
  summary = train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["steps"] == config.train.num_steps and not summary["preempted"]
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, config.train.num_steps + 1))
  for r in rows:
    for key in ("d_loss", "g_loss", "r1", "r2", "d_real", "d_fake"):
      assert np.isfinite(r[key]), (key, r)
    assert r["d_grad_norm"] > 0 and r["g_grad_norm"] > 0
  assert json.load(open(tmp_path / "run" / "config.json"))["model"]["discriminator"] == "r3gan"
