"""The relativistic pairing loss with R1 and R2 (R3GAN's objective), against
hand-computed values and an independent re-computation of one train step."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medgen_jax.train import losses, state as state_lib, step as step_lib
from conftest import INFO, TinyD, TinyG, step_noise, tiny_batch, tiny_config


def _softplus(x):
  return math.log1p(math.exp(x))


def test_rpgan_losses_match_hand_computed():
  real, fake = jnp.array([2.0, -1.0, 0.5]), jnp.array([0.5, -3.0, 1.5])
  # Pairs (real_i - fake_i) = 1.5, 2.0, -1.0.
  want_d = (_softplus(-1.5) + _softplus(-2.0) + _softplus(1.0)) / 3
  want_g = (_softplus(1.5) + _softplus(2.0) + _softplus(-1.0)) / 3
  fns = losses.get_gan_loss("rpgan")
  assert fns.relativistic
  np.testing.assert_allclose(fns.d(real, fake), want_d, rtol=1e-6)
  np.testing.assert_allclose(fns.g(fake, real), want_g, rtol=1e-6)


def test_rpgan_pairs_examples_in_order():
  """Swapping which fake is paired with which real changes the loss: the
  loss is over pairs, not a difference of batch means."""
  real, fake = jnp.array([3.0, -1.0]), jnp.array([2.0, -2.0])  # pairs differ by 1, 1
  fns = losses.get_gan_loss("rpgan")
  paired = fns.d(real, fake)
  swapped = fns.d(real, fake[::-1])
  np.testing.assert_allclose(paired, _softplus(-1.0), rtol=1e-6)
  np.testing.assert_allclose(swapped, (_softplus(-5.0) + _softplus(3.0)) / 2, rtol=1e-6)


def test_non_relativistic_losses_ignore_real_logits():
  fake = jnp.array([0.5, -3.0])
  for name in ("nonsaturating", "hinge"):
    fns = losses.get_gan_loss(name)
    assert not fns.relativistic
    np.testing.assert_allclose(fns.g(fake, jnp.array([9.0, 9.0])), fns.g(fake), rtol=0)


def _per_example_grad_sq(d_fn, x):
  """mean_i ||d D(x_i) / d x_i||^2, one example at a time (brute force)."""
  grad_one = jax.grad(lambda xi: d_fn(xi[None])[0])
  return float(np.mean([np.sum(np.square(grad_one(xi))) for xi in x]))


def test_rpgan_step_with_r1_and_r2_matches_independent_computation():
  r1_gamma, r2_gamma = 0.7, 1.3
  config = tiny_config(gan="rpgan", augment="", r1_gamma=r1_gamma, r2_gamma=r2_gamma,
                       r1_every=1)
  models = state_lib.make_models(TinyG(), TinyD(spectral_norm=False), config)
  state = state_lib.make_init_fn(models, INFO, latent_dim=4, seed=0)()
  step = jax.jit(functools.partial(step_lib.train_step, models=models,
                                   loss_config=config.loss, latent_dim=4, with_r1=True))
  batch = jax.tree.map(jnp.asarray, tiny_batch(0))
  new_state, m = step(state, batch, None)

  z_d, z_g = step_noise(state)
  cond = {"lesion": batch["lesion"]}
  G = lambda p, z: models.generator.apply({"params": p}, z, cond, train=True)
  D = lambda p, x: models.discriminator.apply({"params": p}, x, cond, train=True)

  real, fake = batch["image"], G(state.g_params, z_d)
  want_d = np.mean(np.logaddexp(0, D(state.d_params, fake) - D(state.d_params, real)))
  def penalty(images):  # R1 / R2 example by example, each with its own condition
    return float(np.mean([_per_example_grad_sq(
        lambda xi, i=i: models.discriminator.apply(
            {"params": state.d_params}, xi, {"lesion": cond["lesion"][i:i + 1]}, train=True),
        images[i:i + 1]) for i in range(8)]))
  r1, r2 = penalty(real), penalty(fake)
  np.testing.assert_allclose(m["d_loss"], want_d, rtol=1e-5)
  np.testing.assert_allclose(m["r1"], r1, rtol=1e-5)
  np.testing.assert_allclose(m["r2"], r2, rtol=1e-5)

  # D's gradient is that of the loss plus gamma/2 * (R1, R2): compare norms.
  def d_total(p):
    loss = jnp.mean(jax.nn.softplus(D(p, fake) - D(p, real)))
    sq = lambda x: jnp.mean(jnp.sum(jnp.square(jax.vmap(
        lambda xi, li: jax.grad(lambda y: models.discriminator.apply(
            {"params": p}, y[None], {"lesion": li[None]}, train=True)[0])(xi))(
                x, cond["lesion"])).reshape(8, -1), axis=-1))
    return loss + 0.5 * r1_gamma * sq(real) + 0.5 * r2_gamma * sq(fake)
  want_norm = optax.global_norm(jax.grad(d_total)(state.d_params))
  np.testing.assert_allclose(m["d_grad_norm"], want_norm, rtol=1e-4)

  # G's loss pairs its fakes with the same reals, scored by the updated D.
  d_new = new_state.d_params
  want_g = np.mean(np.logaddexp(0, D(d_new, real) - D(d_new, G(state.g_params, z_g))))
  np.testing.assert_allclose(m["g_loss"], want_g, rtol=1e-5)


def test_without_penalty_step_r2_is_zero():
  config = tiny_config(gan="rpgan", augment="", r1_gamma=0.0, r2_gamma=1.0, r1_every=2)
  models = state_lib.make_models(TinyG(), TinyD(), config)
  state = state_lib.make_init_fn(models, INFO, latent_dim=4, seed=0)()
  assert step_lib.r1_due(config.loss, 0) and not step_lib.r1_due(config.loss, 1)
  step = jax.jit(functools.partial(step_lib.train_step, models=models, loss_config=config.loss,
                                         latent_dim=config.model.latent_dim,
                                   with_r1=False))
  _, m = step(state, jax.tree.map(jnp.asarray, tiny_batch(0)), None)
  assert float(m["r1"]) == 0.0 and float(m["r2"]) == 0.0 and bool(m["is_finite"])
