"""Collapse diagnostics: relative spread by hand, where noise is lost, D's train/test gap."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medgen_jax.studies import diagnostics


def test_relative_spread_hand_computed():
  # Rows (1, 0) and (-1, 0): mean (0, 0), each 1 away, each of norm 1.
  assert diagnostics.relative_spread(np.array([[1.0, 0.0], [-1.0, 0.0]])) == 1.0
  # Rows (3, 4) and (3, 4): no spread.
  assert diagnostics.relative_spread(np.array([[3.0, 4.0], [3.0, 4.0]])) == 0.0
  # Rows (2, 0), (4, 0): mean (3, 0), distances 1 and 1, mean norm 3.
  np.testing.assert_allclose(diagnostics.relative_spread(np.array([[2.0, 0], [4.0, 0]])),
                             1 / 3)


class _Stem(nn.Module):
  @nn.compact
  def __call__(self, z, c):
    return nn.Dense(4)(z) + nn.Embed(3, 4)(c), nn.Dense(2)(c.astype(jnp.float32)[:, None])


class _Gen(nn.Module):
  """Stem sees the noise; with `drop_noise` the head multiplies it by zero."""
  drop_noise: bool

  @nn.compact
  def __call__(self, z, conditions, *, train):
    tokens, style = _Stem(name="stem")(z, conditions["lesion"])
    if self.drop_noise:
      tokens = 0.0 * tokens + nn.Embed(3, 4, name="table")(conditions["lesion"])
    return jnp.tanh(nn.Dense(6, name="head")(tokens)).reshape(-1, 3, 2, 1)


def test_noise_spread_finds_where_noise_is_lost():
  z = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  cond = {"lesion": jnp.full((5,), 2, jnp.int32)}
  for drop, image_has_noise in ((False, True), (True, False)):
    g = _Gen(drop_noise=drop)
    variables = g.init(jax.random.PRNGKey(1), z, cond, train=False)
    spread = diagnostics.noise_spread(g, variables, cond, z)
    assert spread["stem[0]"] > 0.1  # the tokens depend on z
    assert spread["stem[1]"] == 0.0  # the "style" here sees only the condition
    assert (spread["image"] > 1e-3) == image_has_noise, spread
    assert (spread["head"] > 1e-3) == image_has_noise


class _D(nn.Module):
  @nn.compact
  def __call__(self, images, conditions, *, train):
    return nn.Dense(1)(images.reshape(images.shape[0], -1))[:, 0]


def test_discriminator_gap_matches_direct_scores():
  rng = np.random.default_rng(0)
  d = _D()
  train = rng.normal(size=(6, 3, 2, 1)).astype(np.float32)
  test = rng.normal(size=(4, 3, 2, 1)).astype(np.float32)
  variables = d.init(jax.random.PRNGKey(0), train, {}, train=False)
  out = diagnostics.discriminator_gap(d, variables, {"train": (train, {}), "test": (test, {})})
  want_train = float(np.mean(d.apply(variables, train, {}, train=False)))
  want_test = float(np.mean(d.apply(variables, test, {}, train=False)))
  np.testing.assert_allclose(out["logit_train"], want_train, rtol=1e-6)
  np.testing.assert_allclose(out["train_minus_test"], want_train - want_test, rtol=1e-5)
