"""Minibatch-std channel of the discriminator, against a numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.data.info import ConditionField
from medgen_jax.models.discriminator import ResNetDiscriminator, minibatch_std


def test_matches_numpy_reference_per_contiguous_group():
  x = np.random.default_rng(0).normal(size=(8, 3, 5, 2)).astype(np.float32)
  out = np.asarray(minibatch_std(jnp.asarray(x), 4))
  assert out.shape == (8, 3, 5, 3)
  np.testing.assert_array_equal(out[..., :2], x)
  for g in range(2):
    group = x[4 * g:4 * g + 4].astype(np.float64)
    expected = np.mean(np.sqrt(group.var(axis=0) + 1e-8))
    np.testing.assert_allclose(out[4 * g:4 * g + 4, ..., 2], expected, rtol=1e-5)
  # Identical examples (a collapsed generator): the statistic is ~0.
  same = np.repeat(x[:1], 4, axis=0)
  assert np.abs(np.asarray(minibatch_std(jnp.asarray(same), 4))[..., 2]).max() < 1e-3
  with pytest.raises(ValueError, match="batch 8 is not a multiple of the group size 3"):
    minibatch_std(jnp.asarray(x), 3)


@pytest.mark.slow  # ~25 s: compiles D's Jacobian; the numpy reference test stays fast
def test_discriminator_logit_depends_on_own_group_only():
  d = ResNetDiscriminator(conditions=(ConditionField("lesion", "categorical", 3),),
                          width=8, spectral_norm=False, minibatch_std=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 1))
  cond = {"lesion": jnp.array([0, 1, 2, 0])}
  params = d.init(jax.random.PRNGKey(1), x, cond, train=False)
  base = np.asarray(d.apply(params, x, cond, train=False))
  changed = np.asarray(d.apply(params, x.at[1].multiply(3.0), cond, train=False))
  # Example 1 shares its group with example 0, not with 2 and 3.
  assert abs(changed[0] - base[0]) > 1e-6
  np.testing.assert_allclose(changed[2:], base[2:], rtol=1e-6, atol=1e-6)
  plain = ResNetDiscriminator(conditions=d.conditions, width=8, spectral_norm=False)
  p2 = plain.init(jax.random.PRNGKey(1), x, cond, train=False)
  isolated = np.asarray(plain.apply(p2, x.at[1].multiply(3.0), cond, train=False))
  np.testing.assert_allclose(isolated[0], np.asarray(plain.apply(p2, x, cond, train=False))[0],
                             rtol=1e-6)


def test_batch_smaller_than_a_group_is_one_group():
  x = np.random.default_rng(1).normal(size=(1, 4, 4, 2)).astype(np.float32)
  out = np.asarray(minibatch_std(jnp.asarray(x), 4))  # init's batch-1 dummy
  np.testing.assert_allclose(out[..., 2], 1e-4, rtol=1e-3)  # sqrt(0 + 1e-8)
