"""ODE solvers on fields with known solutions, classifier-free guidance, and the
flow generator's sampler against an explicit Euler loop over its velocity."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import INFO
from medgen_jax.models import ode
from medgen_jax.models.velocity import build_flow_generator, null_conditions

X1 = jnp.array([[1.0, -2.0], [0.5, 3.0]])
A = jnp.array([0.3, -1.2])
B = jnp.array([2.0, 0.5])


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("num_steps", [1, 4, 7])
def test_constant_field_reaches_the_endpoint(solver, num_steps):
  # dx/dt = A from t = 1 to 0: x(0) = x1 - A, exact for both solvers.
  x0 = ode.integrate(lambda x, t: jnp.broadcast_to(A, x.shape), X1,
                     num_steps=num_steps, solver=solver)
  np.testing.assert_allclose(x0, X1 - A, rtol=1e-6, atol=1e-6)


def _linear_in_t(x, t):
  return A + B * t[:, None]  # v = A + B t, independent of x


@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_heun_is_exact_for_a_field_linear_in_t(num_steps):
  # x(0) = x1 - integral_0^1 (A + B t) dt = x1 - A - B / 2.
  x0 = ode.integrate(_linear_in_t, X1, num_steps=num_steps, solver="heun")
  np.testing.assert_allclose(x0, X1 - A - B / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_steps", [1, 4])
def test_euler_error_on_a_linear_field_is_the_left_rule(num_steps):
  # Euler evaluates v at the start of each step, t_k = 1 - k h: it subtracts
  # h * sum_k (A + B t_k) = A + B (1 + h) / 2, an error of B h / 2.
  h = 1.0 / num_steps
  x0 = ode.integrate(_linear_in_t, X1, num_steps=num_steps, solver="euler")
  np.testing.assert_allclose(x0, X1 - A - B * (1 + h) / 2, rtol=1e-6, atol=1e-6)


def test_guidance_formula():
  v_cond, v_null = jnp.array([1.0, 4.0]), jnp.array([3.0, 0.0])
  np.testing.assert_allclose(ode.guide(v_cond, v_null, 0.0), v_null)
  np.testing.assert_allclose(ode.guide(v_cond, v_null, 1.0), v_cond)
  np.testing.assert_allclose(ode.guide(v_cond, v_null, 3.0), [-3.0, 12.0])


def test_bad_solver_settings():
  with pytest.raises(ValueError, match="solver"):
    ode.integrate(_linear_in_t, X1, num_steps=2, solver="rk4")
  with pytest.raises(ValueError, match="num_steps"):
    ode.time_grid(0)


def tiny_flow_model_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      variant="Ti", depth=1, token_grid=4, attention="full", window_size=2, mlp_ratio=2,
      cond_dim=16, cond_dropout=0.0, qk_norm=True, chunk_size=None,
      position_encoding="learned", dtype="float32", sample_steps=3, solver="euler",
      guidance_scale=1.0, latent_dim=64, backbone="dit"))
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def flow_model():
  """A tiny FlowGenerator on conftest's 8x8 INFO with random (non-zero) parameters."""
  g = build_flow_generator(tiny_flow_model_config(), INFO)
  cond = {"lesion": jnp.array([0, 1, 2, -1], jnp.int32)}
  # Only the shapes are used (the values are redrawn below): jit's init traces once
  # instead of dispatching every op.
  params = jax.jit(lambda key: g.init(key, jnp.zeros((4, 64)), cond, train=False))(
      jax.random.PRNGKey(0))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape)
                                     for k, l in zip(keys, leaves)])
  z = jax.random.normal(jax.random.PRNGKey(2), (4, 64))
  return g, params, z


def _sample(g, params, z, cond, **fields):
  return np.asarray(g.clone(**fields).apply({"params": params}, z, cond, train=False))


def test_sampler_is_the_euler_loop_over_the_velocity(flow_model):
  g, params, z = flow_model
  cond = {"lesion": jnp.array([0, 1, 2, -1], jnp.int32)}
  scale = 2.5
  got = _sample(g, params, z, cond, guidance_scale=scale)
  # Reference: three explicit Euler steps with guidance written out.
  velocity = lambda x, t, c: g.apply({"params": params}, x, t, c, train=False,
                                     method="velocity")
  x = z.reshape(4, 8, 8, 1)
  for t, t_next in [(1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0)]:
    tb = jnp.full((4,), t)
    v_c, v_n = velocity(x, tb, cond), velocity(x, tb, null_conditions(cond))
    x = x + (t_next - t) * (v_n + scale * (v_c - v_n))
  # Eager calls vs one compiled scan: float32 rounding differs (~1e-4 here,
  # velocities ~3); a wrong time, step or guidance sign is off by ~0.1 or more.
  np.testing.assert_allclose(got, np.clip(x, -1, 1), rtol=0, atol=1e-3)
  assert 0.01 < np.abs(got).mean() < 1.0


def test_guidance_with_unknown_conditions_is_the_unconditional_sample(flow_model):
  g, params, z = flow_model
  unknown = {"lesion": jnp.full((4,), -1, jnp.int32)}
  plain = _sample(g, params, z, unknown, guidance_scale=1.0)
  for scale in (0.0, 4.0):  # both branches see the null embedding
    np.testing.assert_allclose(_sample(g, params, z, unknown, guidance_scale=scale),
                               plain, rtol=1e-5, atol=1e-6)
  known = {"lesion": jnp.array([2, 2, 2, 2], jnp.int32)}
  assert np.abs(_sample(g, params, z, known, guidance_scale=4.0)
                - _sample(g, params, z, known, guidance_scale=1.0)).max() > 1e-3
