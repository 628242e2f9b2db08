"""The pure GAN train step on tiny stand-in models (values, lazy R1, state, NaN flag).

The stand-in networks and config here are also imported by the other train
tests (parallel equivalence, checkpoint resume); they follow the
models interface G(z, conditions, *, train), D(images, conditions, *, train).
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medgen_jax.data.info import ConditionField, DatasetInfo, IntensityTransform
from medgen_jax.train import ema, losses, state as state_lib, step as step_lib

INFO = DatasetInfo(
    name="synthetic", image_shape=(8, 8, 1), modalities=("ct",),
    intensity=(IntensityTransform("ct", "HU", -1000.0, 1000.0),),
    conditions=(ConditionField("lesion", "categorical", 3, ("none", "small", "large")),))


class TinyG(nn.Module):
  shape: tuple = INFO.image_shape

  @nn.compact
  def __call__(self, z, conditions, *, train):
    h = nn.Dense(16)(z) + nn.Embed(3, 16)(jnp.maximum(conditions["lesion"], 0))
    x = nn.Dense(math.prod(self.shape))(nn.relu(h))
    return jnp.tanh(x).reshape((-1,) + tuple(self.shape))


class TinyD(nn.Module):
  spectral_norm: bool = True

  @nn.compact
  def __call__(self, images, conditions, *, train):
    h = nn.Dense(8)(images.reshape(images.shape[0], -1))
    if self.spectral_norm:
      h = nn.SpectralNorm(nn.Dense(8))(h, update_stats=train)
    h = nn.leaky_relu(h, 0.2)
    proj = nn.Embed(3, 8)(jnp.maximum(conditions["lesion"], 0))
    return nn.Dense(1)(h)[:, 0] + jnp.sum(proj * h, axis=-1)


def tiny_config(**loss_overrides):
  loss = dict(gan="nonsaturating", r1_gamma=1.0, r2_gamma=0.0, r1_every=2,
              augment="translation,cutout,intensity", ema_decay=0.9)
  loss.update(loss_overrides)
  return ml_collections.ConfigDict(dict(
      model=dict(latent_dim=4),
      train=dict(num_steps=10, batch_size=8, seed=0),
      optim=dict(g_lr=1e-3, d_lr=2e-3, b1=0.0, b2=0.99, schedule="constant",
                 warmup_steps=0, grad_clip=1.0),
      loss=loss,
      parallel=dict(mode="jit", mesh=dict(data=-1, seq=1),
                    logical_axis_rules=(("batch", "data"),))))


def tiny_batch(i, batch_size=8):
  rng = np.random.default_rng(i)
  return {"image": rng.uniform(-1, 1, (batch_size, 8, 8, 1)).astype(np.float32),
          "lesion": rng.integers(0, 3, batch_size).astype(np.int32)}


def make(config, spectral_norm=True):
  """(models, initial state, jitted step); tests compile only what they need."""
  models = state_lib.make_models(TinyG(), TinyD(spectral_norm=spectral_norm), config)
  init = state_lib.make_init_fn(models, INFO, latent_dim=config.model.latent_dim,
                                seed=config.train.seed)
  step = jax.jit(functools.partial(step_lib.train_step, models=models, config=config))
  return models, init(), step


def test_ema_matches_hand_computed():
  out = ema.ema_update({"a": jnp.array([1.0, 2.0])}, {"a": jnp.array([3.0, 0.0])}, 0.75)
  np.testing.assert_allclose(out["a"], [0.75 * 1 + 0.25 * 3, 0.75 * 2], rtol=1e-6)


def test_losses_match_independent_computation():
  config = tiny_config(augment="", r1_gamma=0.0)
  models, state, step = make(config, spectral_norm=False)
  batch = jax.tree.map(jnp.asarray, tiny_batch(0))
  new_state, m = step(state, batch, None)
  # The step's documented RNG layout: keys = split(fold_in(rng, step), 8), z from keys[0:2].
  keys = jax.random.split(jax.random.fold_in(state.rng, 0), 8)
  z_d, z_g = (jax.random.normal(k, (8, 4)) for k in keys[:2])
  cond = {"lesion": batch["lesion"]}
  G = lambda p, z: models.generator.apply({"params": p}, z, cond, train=True)
  D = lambda p, x: models.discriminator.apply({"params": p}, x, cond, train=True)
  real_logits = D(state.d_params, batch["image"])
  fake_logits = D(state.d_params, G(state.g_params, z_d))
  want_d = (np.mean(np.logaddexp(0, -real_logits)) + np.mean(np.logaddexp(0, fake_logits)))
  want_g = np.mean(np.logaddexp(0, -D(new_state.d_params, G(state.g_params, z_g))))
  np.testing.assert_allclose(m["d_loss"], want_d, rtol=1e-5)
  np.testing.assert_allclose(m["d_real"], np.mean(real_logits), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["g_loss"], want_g, rtol=1e-5)
  assert float(m["r1"]) == 0.0 and bool(m["is_finite"])
  # EMA moved a (1 - decay) fraction towards the new generator params.
  want_ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, new_state.g_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_state.ema_params,
               want_ema)


@functools.cache
def _default():
  return make(tiny_config())  # shared so the step compiles once for two tests


def test_lazy_r1_only_on_multiples_and_state_threads():
  _, state, step = _default()
  assert "batch_stats" in state.d_state
  s1, m0 = step(state, jax.tree.map(jnp.asarray, tiny_batch(0)), None)
  s2, m1 = step(s1, jax.tree.map(jnp.asarray, tiny_batch(1)), None)
  assert float(m0["r1"]) > 0 and float(m1["r1"]) == 0.0
  assert int(s2.step) == 2
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.d_state, s1.d_state)
  assert any(jax.tree.leaves(changed)), "spectral norm stats were not updated"
  for m in (m0, m1):
    assert bool(m["is_finite"]) and float(m["g_grad_norm"]) > 0


def test_static_r1_switch_equals_on_device_cond():
  """with_r1=True/False (the Trainer's two executables) == the lax.cond path."""
  models, state, cond_step = _default()
  config = tiny_config()
  static = {w: jax.jit(functools.partial(step_lib.train_step, models=models, config=config,
                                         with_r1=w)) for w in (True, False)}
  s = state
  for i in range(3):
    batch = jax.tree.map(jnp.asarray, tiny_batch(i))
    want_state, want = cond_step(s, batch, None)
    got_state, got = static[step_lib.r1_due(config.loss, i)](s, batch, None)
    assert (float(got["r1"]) > 0) == (i % 2 == 0)
    for k in ("d_loss", "g_loss", "r1"):
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 got_state.d_params, want_state.d_params)
    s = want_state


def test_non_finite_batch_sets_flag():
  _, state, step = _default()
  batch = tiny_batch(0)
  batch["image"][0] = np.nan  # a whole image, so augmentation cannot crop it away
  _, m = step(state, jax.tree.map(jnp.asarray, batch), None)
  assert not bool(m["is_finite"])


def tiny_examples(n=24, nan_at=None):
  """In-memory examples in the data layer's format ('image' [8, 8, 1], 'lesion')."""
  rng = np.random.default_rng(0)
  out = [{"image": rng.uniform(-1, 1, (8, 8, 1)).astype(np.float32),
          "lesion": np.int32(rng.integers(0, 3))} for _ in range(n)]
  if nan_at is not None:
    out[nan_at]["image"][:] = np.nan
  return out


def tiny_iterator(batch_size=8, shuffle=True, **kwargs):
  """A checkpointable grain iterator over tiny_examples (like load_dataset's)."""
  import grain  # pylint: disable=import-outside-toplevel
  ds = grain.MapDataset.source(tiny_examples(**kwargs))
  if shuffle:
    ds = ds.shuffle(seed=0)
  return iter(ds.repeat().batch(batch_size, drop_remainder=True))


def tiny_loop_config(**train_overrides):
  """tiny_config plus the loop's train fields."""
  config = tiny_config()
  config.train.update(dict(num_steps=6, log_every=1, sample_every=100, checkpoint_every=1,
                           keep_checkpoints=10))
  config.train.update(train_overrides)
  return config


class TinyHeadD(nn.Module):
  """TinyD's interface plus AC-GAN heads (`with_predictions`)."""
  conditions: tuple = INFO.conditions
  condition_heads: bool = True

  @nn.compact
  def __call__(self, images, conditions, *, train, with_predictions=False):
    h = nn.leaky_relu(nn.Dense(8)(images.reshape(images.shape[0], -1)), 0.2)
    logits = nn.Dense(1)(h)[:, 0]
    predictions = {"lesion": nn.Dense(3, name="predict_lesion")(h)}
    return (logits, predictions) if with_predictions else logits


def test_condition_and_diversity_terms_match_independent_computation():
  config = tiny_config(augment="", r1_gamma=0.0, condition_weight=0.5,
                       diversity_weight=0.3, diversity_cap=10.0)
  models = state_lib.make_models(TinyG(), TinyHeadD(), config)
  state = state_lib.make_init_fn(models, INFO, latent_dim=4, seed=0)()
  batch = jax.tree.map(jnp.asarray, tiny_batch(0))
  new_state, m = jax.jit(functools.partial(step_lib.train_step, models=models,
                                           config=config))(state, batch, None)
  keys = jax.random.split(jax.random.fold_in(state.rng, 0), 8)
  z_d, z_g = (np.asarray(jax.random.normal(k, (8, 4))) for k in keys[:2])
  cond = {"lesion": batch["lesion"]}
  G = lambda p, z: np.asarray(models.generator.apply({"params": p}, z, cond, train=True))
  heads = lambda p, x: np.asarray(models.discriminator.apply(
      {"params": p}, x, cond, train=True, with_predictions=True)[1]["lesion"], np.float64)
  labels = np.asarray(batch["lesion"])

  def cross_entropy(logits):
    log_z = np.log(np.sum(np.exp(logits), axis=-1))
    return float(np.mean(log_z - logits[np.arange(len(labels)), labels]))

  np.testing.assert_allclose(m["d_cond"], cross_entropy(heads(state.d_params, batch["image"])),
                             rtol=1e-5)
  fake_g, fake_d = G(state.g_params, z_g), G(state.g_params, z_d)
  np.testing.assert_allclose(m["g_cond"], cross_entropy(heads(new_state.d_params, fake_g)),
                             rtol=1e-5)
  ratio = (np.abs(fake_g - fake_d).reshape(8, -1).mean(-1) / np.abs(z_g - z_d).mean(-1))
  np.testing.assert_allclose(m["g_diversity"], np.mean(np.minimum(ratio, 10.0)), rtol=1e-5)
  # The terms reach the generator: without them its update differs.
  plain = tiny_config(augment="", r1_gamma=0.0)
  plain_models = state_lib.make_models(TinyG(), TinyHeadD(), plain)
  plain_state, _ = jax.jit(functools.partial(step_lib.train_step, models=plain_models,
                                             config=plain))(state, batch, None)
  assert not np.allclose(jax.tree.leaves(plain_state.g_params)[0],
                         jax.tree.leaves(new_state.g_params)[0])


def test_teacher_term_matches_independent_computation():
  from medgen_jax.models.classifier import FeatureNet
  teacher = FeatureNet(INFO.conditions, widths=(4,), feature_dim=4)
  teacher_params = teacher.init(jax.random.PRNGKey(5), jnp.zeros((1, 8, 8, 1)))["params"]
  config = tiny_config(augment="", r1_gamma=0.0, teacher_weight=0.7)
  models = state_lib.make_models(TinyG(), TinyD(spectral_norm=False), config,
                                 teacher=(teacher, teacher_params))
  state = state_lib.make_init_fn(models, INFO, latent_dim=4, seed=0)()
  batch = jax.tree.map(jnp.asarray, tiny_batch(0))
  step = jax.jit(functools.partial(step_lib.train_step, models=models, config=config))
  new_state, m = step(state, batch, None)
  keys = jax.random.split(jax.random.fold_in(state.rng, 0), 8)
  z_g = jax.random.normal(keys[1], (8, 4))
  fake = models.generator.apply({"params": state.g_params}, z_g, {"lesion": batch["lesion"]},
                                train=True)
  _, heads = teacher.apply({"params": teacher_params}, fake)
  logits, labels = np.asarray(heads["lesion"], np.float64), np.asarray(batch["lesion"])
  log_z = np.log(np.sum(np.exp(logits), axis=-1))
  want = np.mean(log_z - logits[np.arange(8), labels])
  np.testing.assert_allclose(m["g_teacher"], want, rtol=1e-5)
  # The teacher is frozen (not in the state) and its loss reaches G's gradient
  # (compared by norm: Adam's first update is sign-like, so params may agree).
  plain = tiny_config(augment="", r1_gamma=0.0)
  plain_models = state_lib.make_models(TinyG(), TinyD(spectral_norm=False), plain)
  _, plain_m = jax.jit(functools.partial(step_lib.train_step, models=plain_models,
                                         config=plain))(state, batch, None)
  assert "g_teacher" not in plain_m
  assert abs(float(plain_m["g_grad_norm"]) - float(m["g_grad_norm"])) > 1e-4
