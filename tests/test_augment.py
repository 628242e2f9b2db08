"""DiffAugment ops: known shifts, cutout boxes, intensity maths, differentiability."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.train import augment


def test_translation_moves_pixels_by_known_shift_2d():
  x = jnp.arange(2 * 16 * 16, dtype=jnp.float32).reshape(2, 16, 16, 1) + 1.0
  shift = jnp.array([[1, -2], [0, 2]])  # pad is 2 for size 16
  y = augment.translate(x, shift, pad_mode="zero")
  xn, yn = np.asarray(x), np.asarray(y)
  # out[i, j] = in[i - 1, j + 2] for example 0; vacated rows/cols are 0.
  np.testing.assert_array_equal(yn[0, 1:, :-2], xn[0, :-1, 2:])
  assert np.all(yn[0, 0] == 0) and np.all(yn[0, :, -2:] == 0)
  np.testing.assert_array_equal(yn[1, :, 2:], xn[1, :, :-2])
  assert np.all(yn[1, :, :2] == 0)


def test_translation_edge_pad_repeats_border_3d():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 8, 2))
  y = augment.translate(x, jnp.array([[1, 0, -1]]), pad_mode="edge")
  xn, yn = np.asarray(x), np.asarray(y)
  np.testing.assert_array_equal(yn[0, 1:, :, :-1], xn[0, :-1, :, 1:])
  np.testing.assert_array_equal(yn[0, 0, :, :-1], xn[0, 0, :, 1:])  # edge row repeated
  np.testing.assert_array_equal(yn[0, 1:, :, -1], xn[0, :-1, :, -1])


def test_cutout_zeroes_half_size_box():
  x = jnp.ones((1, 8, 8, 1))
  y = np.asarray(augment.cutout(x, jnp.array([[4, 2]])))[0, ..., 0]
  want = np.ones((8, 8))
  want[2:6, 0:4] = 0  # box 4, lo = center - 2
  np.testing.assert_array_equal(y, want)


def test_intensity_matches_formula():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 1))
  b, c = jnp.array([0.1, -0.3]), jnp.array([0.5, 1.5])
  y = augment.intensity(x, b, c)
  xb = np.asarray(x) + np.asarray(b)[:, None, None, None]
  mean = xb.mean(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(y, (xb - mean) * np.asarray(c)[:, None, None, None] + mean,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (2, 4, 8, 8, 2)])
def test_augment_is_differentiable_and_keeps_shape(shape):
  x = jax.random.normal(jax.random.PRNGKey(2), shape)
  policy = "translation,cutout,intensity"
  y = augment.augment(x, jax.random.PRNGKey(3), policy)
  assert y.shape == x.shape
  # The augmentation is linear in x for fixed params: check grad against a
  # finite difference along a random direction.
  params = augment.sample_params(jax.random.PRNGKey(3), policy, shape[0], shape[1:-1])
  f = jax.jit(lambda im: jnp.sum(augment.apply_params(im, params, policy) ** 2))
  g = jax.jit(jax.grad(f))(x)
  assert float(jnp.sum(jnp.abs(g))) > 0
  v = jax.random.normal(jax.random.PRNGKey(4), shape)
  eps = 1e-2
  fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
  # f is quadratic so the central difference is exact up to float32 rounding.
  np.testing.assert_allclose(jnp.vdot(g, v), fd, rtol=1e-2)


def test_empty_policy_is_identity_and_unknown_op_errors():
  x = jnp.ones((1, 4, 4, 1))
  np.testing.assert_array_equal(augment.augment(x, jax.random.PRNGKey(0), ""), x)
  with pytest.raises(ValueError, match="unknown augmentation op"):
    augment.parse_policy("translation,flip")
