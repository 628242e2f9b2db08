"""ConditionEmbedding null handling and dropout, AttentionGate zero init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.conditioning import AttentionGate, ConditionEmbedding

MODULE = ConditionEmbedding(categorical=(("lesion", 3), ("site", 2)),
                            continuous=(("age", 20.0, 90.0),), dim=8)


def _conds(lesion, site, age):
  return {"lesion": jnp.asarray(lesion, jnp.int32), "site": jnp.asarray(site, jnp.int32),
          "age": jnp.asarray(age, jnp.float32)}


@pytest.fixture(scope="module")
def params():
  return MODULE.init(jax.random.PRNGKey(0), _conds([0, 1], [0, 1], [30.0, 60.0]),
                     train=False)


def test_nulls_are_learned_rows(params):
  p = params["params"]
  out = MODULE.apply(params, _conds([-1, 2], [-1, 1], [np.nan, 45.0]), train=False)
  assert out.shape == (2, 8)
  all_null = p["embed_lesion"]["embedding"][3] + p["embed_site"]["embedding"][2] + p["null_age"]
  np.testing.assert_allclose(out[0], all_null, rtol=1e-6)
  # Only the lesion field differs between these two examples.
  pair = MODULE.apply(params, _conds([-1, 0], [1, 1], [45.0, 45.0]), train=False)
  np.testing.assert_allclose(pair[0] - pair[1], p["embed_lesion"]["embedding"][3]
                             - p["embed_lesion"]["embedding"][0], rtol=1e-5, atol=1e-6)
  # Distinct known values give distinct embeddings.
  ages = MODULE.apply(params, _conds([0, 0], [0, 0], [20.0, 90.0]), train=False)
  assert float(jnp.abs(ages[0] - ages[1]).max()) > 1e-4


def test_nan_does_not_poison_gradients(params):
  def loss(p):
    return MODULE.apply(p, _conds([-1, 1], [0, -1], [np.nan, 70.0]), train=False).sum()
  grads = jax.jit(jax.grad(loss))(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


def test_dropout_rate_one_gives_all_null(params):
  dropper = MODULE.clone(dropout_rate=1.0)
  conds = _conds([0, 2, 1], [1, 0, 1], [25.0, 50.0, 80.0])
  dropped = dropper.apply(params, conds, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
  null = MODULE.apply(params, _conds([-1] * 3, [-1] * 3, [np.nan] * 3), train=False)
  np.testing.assert_allclose(dropped, null, rtol=1e-6)
  # Not in training: dropout is off and needs no rng.
  np.testing.assert_allclose(dropper.apply(params, conds, train=False),
                             MODULE.apply(params, conds, train=False))


def test_dropout_drops_fields_independently(params):
  dropper = MODULE.clone(dropout_rate=0.5)
  n = 256
  conds = _conds(np.zeros(n), np.zeros(n), np.full(n, 50.0))
  out = dropper.apply(params, conds, train=True, rngs={"dropout": jax.random.PRNGKey(4)})
  distinct = np.unique(np.asarray(out).round(5), axis=0)
  assert len(distinct) == 8  # 2^3 patterns of which fields were dropped


def test_bad_inputs(params):
  with pytest.raises(KeyError, match="missing fields \\['age'\\]"):
    MODULE.apply(params, {"lesion": jnp.zeros(2, jnp.int32), "site": jnp.zeros(2, jnp.int32)},
                 train=False)
  with pytest.raises(KeyError, match="unknown fields \\['sex'\\]"):
    MODULE.apply(params, dict(_conds([0], [0], [30.0]), sex=jnp.zeros(1)), train=False)
  with pytest.raises(ValueError, match="'age' must have shape \\[batch\\]"):
    MODULE.apply(params, _conds([0], [0], [[30.0]]), train=False)
  with pytest.raises(ValueError, match="batch"):
    MODULE.apply(params, _conds([0, 1], [0], [30.0, 40.0]), train=False)
  with pytest.raises(ValueError, match="at least one"):
    ConditionEmbedding(dim=4).init(jax.random.PRNGKey(0), {}, train=False)


def test_attention_gate_zero_init_and_trainable():
  gate = AttentionGate(features=6)
  cond = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
  params = gate.init(jax.random.PRNGKey(1), cond)
  outs = gate.apply(params, cond)
  assert len(outs) == 3
  for o in outs:
    assert o.shape == (3, 6)
    np.testing.assert_array_equal(o, 0.0)
  grads = jax.grad(lambda p: sum(o.sum() for o in gate.apply(p, cond)))(params)
  assert float(jnp.abs(grads["params"]["Dense_0"]["kernel"]).max()) > 0
  with pytest.raises(ValueError, match="cond_dim"):
    gate.apply(params, jnp.zeros((3, 2, 5)))
