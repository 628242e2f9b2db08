"""GAN losses and the R1 penalty against hand-computed values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.train import losses


def _softplus(x):
  return math.log1p(math.exp(x))


def test_nonsaturating_matches_hand_computed():
  real, fake = jnp.array([2.0, -1.0]), jnp.array([0.5, -3.0])
  # -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x).
  want_d = (_softplus(-2.0) + _softplus(1.0)) / 2 + (_softplus(0.5) + _softplus(-3.0)) / 2
  want_g = (_softplus(-0.5) + _softplus(3.0)) / 2
  fns = losses.get_gan_loss("nonsaturating")
  np.testing.assert_allclose(fns.d(real, fake), want_d, rtol=1e-6)
  np.testing.assert_allclose(fns.g(fake), want_g, rtol=1e-6)


def test_hinge_matches_hand_computed():
  real, fake = jnp.array([2.0, 0.25]), jnp.array([-2.0, 0.5])
  # relu(1 - real) = [0, 0.75]; relu(1 + fake) = [0, 1.5].
  fns = losses.get_gan_loss("hinge")
  np.testing.assert_allclose(fns.d(real, fake), 0.375 + 0.75, rtol=1e-6)
  np.testing.assert_allclose(fns.g(fake), 0.75, rtol=1e-6)  # -mean(fake)


def test_unknown_loss_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown loss.gan 'wgan'"):
    losses.get_gan_loss("wgan")


def test_r1_of_linear_discriminator_is_squared_weight_norm():
  w = jnp.arange(12.0).reshape(2, 2, 3) / 10.0
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 3))
  d_fn = lambda im: (jnp.sum(im * w, axis=(1, 2, 3)), "aux")
  r1, logits, aux = losses.gradient_penalty(d_fn, x)
  np.testing.assert_allclose(r1, float(jnp.sum(w ** 2)), rtol=1e-6)
  np.testing.assert_allclose(logits, jnp.sum(x * w, axis=(1, 2, 3)), rtol=1e-6)
  assert aux == "aux"


def test_r1_of_quadratic_discriminator_is_per_example():
  # D(x) = sum(x^2) -> grad 2x, ||grad||^2 = 4 sum(x^2); mean over the batch.
  x = jnp.array([[[[1.0]], [[2.0]]], [[[0.0]], [[3.0]]]])  # [2, 2, 1, 1]
  r1, _, _ = losses.gradient_penalty(lambda im: (jnp.sum(im ** 2, axis=(1, 2, 3)), None), x)
  np.testing.assert_allclose(r1, (4 * 5 + 4 * 9) / 2, rtol=1e-6)


def test_lazy_penalty_weight_scales_by_interval():
  assert losses.lazy_penalty_weight(10.0, 16) == pytest.approx(80.0)
  assert losses.lazy_penalty_weight(1.0, 1) == pytest.approx(0.5)


def test_condition_prediction_loss_matches_hand_computed():
  from medgen_jax.data.info import ConditionField
  fields = (ConditionField("lesion", "categorical", 3),
            ConditionField("age", "continuous", value_range=(20.0, 90.0)))
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, 1.0, 1.0],
                     [0.0, -2.0, 4.0]], np.float32)
  lesion = np.array([0, 1, -1, 2], np.int32)  # third unknown
  age_pred = np.array([0.0, -1.0, 0.5, 9.0], np.float32)
  age = np.array([55.0, 20.0, 90.0, np.nan], np.float32)  # fourth unknown
  loss = losses.condition_prediction_loss(
      {"lesion": jnp.asarray(logits), "age": jnp.asarray(age_pred)},
      {"lesion": jnp.asarray(lesion), "age": jnp.asarray(age)}, fields)
  # Cross-entropy by hand; unknowns add 0 but still count in the batch of 4.
  ce = [-(l[y] - math.log(sum(math.exp(v) for v in l)))
        for l, y in zip(logits.tolist(), lesion.tolist()) if y >= 0]
  # age 55 -> 0.0, 20 -> -1.0, 90 -> 1.0 in [-1, 1] units.
  se = [(0.0 - 0.0) ** 2, (-1.0 + 1.0) ** 2, (0.5 - 1.0) ** 2]
  expected = sum(ce) / 4 + sum(se) / 4
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  # The unknown rows really are ignored: change their predictions wildly.
  logits[2] = [9.0, -9.0, 0.0]
  age_pred[3] = -50.0
  again = losses.condition_prediction_loss(
      {"lesion": jnp.asarray(logits), "age": jnp.asarray(age_pred)},
      {"lesion": jnp.asarray(lesion), "age": jnp.asarray(age)}, fields)
  np.testing.assert_allclose(float(again), expected, rtol=1e-5)


def test_diversity_ratio_matches_hand_computed_and_clips():
  a = np.zeros((2, 2, 2, 1), np.float32)
  b = np.array([np.full((2, 2, 1), 0.5), np.full((2, 2, 1), 4.0)], np.float32)
  za = np.zeros((2, 3), np.float32)
  zb = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]], np.float32)
  # Example 0: 0.5 / 1.0 = 0.5; example 1: 4.0 / 2.0 = 2.0, clipped to 1.5.
  ratio = losses.diversity_ratio(jnp.asarray(a), jnp.asarray(b), jnp.asarray(za),
                                 jnp.asarray(zb), cap=1.5)
  np.testing.assert_allclose(float(ratio), (0.5 + 1.5) / 2, rtol=1e-6)
