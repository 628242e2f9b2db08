"""Sampling noise: truncation and the spherical interpolation behind the noise figure."""
import jax
import numpy as np
import pytest

from medgen_jax.inference import sample


def test_truncation_scales_the_same_draw():
  full = sample.make_noise(3, 5, 7)
  np.testing.assert_allclose(sample.make_noise(3, 5, 7, truncation_psi=0.5), 0.5 * full,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="truncation_psi"):
    sample.make_noise(3, 5, 7, truncation_psi=1.5)


def test_slerp_hand_computed():
  a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])  # 90 degrees apart
  np.testing.assert_allclose(sample.slerp(a, b, 0.5), np.array([1.0, 1.0]) / np.sqrt(2))
  # A third of the way: 30 degrees from a, still on the unit circle.
  np.testing.assert_allclose(sample.slerp(a, b, 1 / 3),
                             [np.cos(np.pi / 6), np.sin(np.pi / 6)], atol=1e-12)


def test_interpolation_rows_run_from_one_draw_to_the_other():
  rows, cols, dim = 3, 6, 4
  z = sample.interpolation_noise(0, rows, cols, dim).reshape(rows, cols, dim)
  ends = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, rows, dim)))
  np.testing.assert_allclose(z[:, 0], ends[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(z[:, -1], ends[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(z[:, 2], sample.slerp(ends[0], ends[1], 2 / 5), rtol=1e-5)
