"""The pure GAN train step on tiny stand-in models (values, lazy R1, state, NaN flag).

The stand-in networks, configs and compiled steps come from conftest.py; they
follow the models interface G(z, conditions, *, train), D(images, conditions,
*, train).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import INFO, TinyD, TinyG, step_noise, tiny_batch, tiny_config
# Re-exported: some test modules import the tiny GAN helpers from here.
from conftest import tiny_examples, tiny_iterator, tiny_loop_config  # noqa: F401
from medgen_jax.classifier import FeatureNet
from medgen_jax.train import ema, losses, state as state_lib, step as step_lib


def test_ema_matches_hand_computed():
  out = ema.ema_update({"a": jnp.array([1.0, 2.0])}, {"a": jnp.array([3.0, 0.0])}, 0.75)
  np.testing.assert_allclose(out["a"], [0.75 * 1 + 0.25 * 3, 0.75 * 2], rtol=1e-6)


def test_losses_match_independent_computation(plain_tiny_step):
  models, state, step = plain_tiny_step
  batch = jax.tree.map(jnp.asarray, tiny_batch(0))
  new_state, m = step(state, batch, None)
  z_d, z_g = step_noise(state)
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


def test_lazy_r1_only_on_multiples_and_state_threads(tiny_step):
  _, state, step = tiny_step
  assert "batch_stats" in state.d_state
  s1, m0 = step(state, jax.tree.map(jnp.asarray, tiny_batch(0)), None)
  s2, m1 = step(s1, jax.tree.map(jnp.asarray, tiny_batch(1)), None)
  assert float(m0["r1"]) > 0 and float(m1["r1"]) == 0.0
  assert int(s2.step) == 2
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.d_state, s1.d_state)
  assert any(jax.tree.leaves(changed)), "spectral norm stats were not updated"
  for m in (m0, m1):
    assert bool(m["is_finite"]) and float(m["g_grad_norm"]) > 0


@pytest.mark.slow  # compiles the step both ways (~6 s)
def test_static_r1_switch_equals_on_device_cond(tiny_step):
  """with_r1=True/False (the Trainer's two executables) == the lax.cond path."""
  models, state, cond_step = tiny_step
  config = tiny_config()
  static = {w: jax.jit(functools.partial(step_lib.train_step, models=models,
                                         loss_config=config.loss,
                                         latent_dim=config.model.latent_dim,
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


def test_non_finite_batch_sets_flag(tiny_step):
  _, state, step = tiny_step
  batch = tiny_batch(0)
  batch["image"][0] = np.nan  # a whole image, so augmentation cannot crop it away
  _, m = step(state, jax.tree.map(jnp.asarray, batch), None)
  assert not bool(m["is_finite"])


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
                                           loss_config=config.loss,
                                   latent_dim=config.model.latent_dim))(state, batch, None)
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
                                             loss_config=plain.loss,
                                             latent_dim=4))(state, batch, None)
  assert not np.allclose(jax.tree.leaves(plain_state.g_params)[0],
                         jax.tree.leaves(new_state.g_params)[0])


def test_teacher_term_matches_independent_computation(plain_tiny_step):
  teacher = FeatureNet(INFO.conditions, widths=(4,), feature_dim=4)
  teacher_params = teacher.init(jax.random.PRNGKey(5), jnp.zeros((1, 8, 8, 1)))["params"]
  config = tiny_config(augment="", r1_gamma=0.0, teacher_weight=0.7)
  models = state_lib.make_models(TinyG(), TinyD(spectral_norm=False), config,
                                 teacher=(teacher, teacher_params))
  state = state_lib.make_init_fn(models, INFO, latent_dim=4, seed=0)()
  batch = jax.tree.map(jnp.asarray, tiny_batch(0))
  step = jax.jit(functools.partial(step_lib.train_step, models=models, loss_config=config.loss,
                                   latent_dim=config.model.latent_dim))
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
  # The plain step is this step without the teacher (same config otherwise).
  _, _, plain_step = plain_tiny_step
  _, plain_m = plain_step(state, batch, None)
  assert "g_teacher" not in plain_m
  assert abs(float(plain_m["g_grad_norm"]) - float(m["g_grad_norm"])) > 1e-4


def test_teacher_margin_real_hinges_at_the_paired_real_batch(plain_tiny_step):
  teacher = FeatureNet(INFO.conditions, widths=(4,), feature_dim=4)
  teacher_params = teacher.init(jax.random.PRNGKey(5), jnp.zeros((1, 8, 8, 1)))["params"]
  batch = jax.tree.map(jnp.asarray, tiny_batch(0))
  _, heads = teacher.apply({"params": teacher_params}, batch["image"])
  logits, labels = np.asarray(heads["lesion"], np.float64), np.asarray(batch["lesion"])
  real_ce = np.mean(np.log(np.sum(np.exp(logits), -1)) - logits[np.arange(8), labels])
  _, _, plain_step = plain_tiny_step
  # The teacher term reaches G's gradient exactly when fakes score worse than reals.
  for weight in (0.7,):
    config = tiny_config(augment="", r1_gamma=0.0, teacher_weight=weight,
                         teacher_margin="real")
    models = state_lib.make_models(TinyG(), TinyD(spectral_norm=False), config,
                                   teacher=(teacher, teacher_params))
    state = state_lib.make_init_fn(models, INFO, latent_dim=4, seed=0)()
    _, m = jax.jit(functools.partial(step_lib.train_step, models=models,
                                     loss_config=config.loss,
                                   latent_dim=config.model.latent_dim))(state, batch, None)
    np.testing.assert_allclose(m["g_teacher_real"], real_ce, rtol=1e-5)
    _, plain_m = plain_step(state, batch, None)
    pushed = abs(float(plain_m["g_grad_norm"]) - float(m["g_grad_norm"])) > 1e-6
    assert pushed == bool(m["g_teacher"] > m["g_teacher_real"])


def test_teacher_hinge_by_hand():
  fake = {"lesion": jnp.float32(1.2), "age": jnp.float32(0.1)}
  real = {"lesion": jnp.float32(1.0), "age": jnp.float32(0.3)}
  # lesion: 1.2 - 1.0 = 0.2 pushed; age: 0.1 < 0.3, no push.
  np.testing.assert_allclose(losses.teacher_hinge(fake, real), 0.2, rtol=1e-6)
  grads = jax.grad(lambda f: losses.teacher_hinge(f, real))(fake)
  assert float(grads["lesion"]) == 1.0 and float(grads["age"]) == 0.0
  with pytest.raises(ValueError, match="no real-batch loss"):
    losses.teacher_hinge(fake, {"lesion": jnp.float32(1.0)})
