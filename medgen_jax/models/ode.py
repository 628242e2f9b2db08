"""ODE solvers for flow-matching sampling, and classifier-free guidance.

Time runs from t = 1 (noise) to t = 0 (data), the convention of the linear
path `x_t = (1 - t) x_0 + t eps` (`medgen_jax.train.flow`): the velocity
`v = dx/dt = eps - x_0`, so a step from t to t' < t adds `(t' - t) v`.

Everything here is a pure function of a velocity function
`velocity_fn(x [B, ...], t [B]) -> [B, ...]`; `integrate` runs the steps in
one `lax.scan`, so the compiled size does not grow with the step count.
The solvers live in `models` (not `inference`) because the training loop's
sample grid and the flow generator (`models.velocity.FlowGenerator`) use
them, and both sit below `inference` in the layer order.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]

SOLVERS = ("euler", "heun")


def time_grid(num_steps: int) -> jax.Array:
  """`[num_steps + 1]` times, uniform from 1 (noise) down to 0 (data)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  return jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)


def _at(t: jax.Array, x: jax.Array) -> jax.Array:
  """Scalar time t -> `[B]`, one per example of x."""
  return jnp.full((x.shape[0],), t, jnp.float32)


def euler_step(velocity_fn: VelocityFn, x: jax.Array, t: jax.Array,
               t_next: jax.Array) -> jax.Array:
  """x(t_next) ~ x + (t_next - t) v(x, t): exact when v is constant."""
  return x + (t_next - t) * velocity_fn(x, _at(t, x)).astype(x.dtype)


def heun_step(velocity_fn: VelocityFn, x: jax.Array, t: jax.Array,
              t_next: jax.Array) -> jax.Array:
  """Heun's (explicit trapezoid) step, two velocity evaluations.

  The Euler prediction's velocity at t_next and the velocity at t are
  averaged: exact when v does not depend on x and is linear in t (the
  trapezoid rule integrates a linear function exactly).
  """
  h = t_next - t
  v = velocity_fn(x, _at(t, x)).astype(x.dtype)
  x_pred = x + h * v
  v_next = velocity_fn(x_pred, _at(t_next, x)).astype(x.dtype)
  return x + 0.5 * h * (v + v_next)


STEPS = {"euler": euler_step, "heun": heun_step}


def integrate(velocity_fn: VelocityFn, x1: jax.Array, *, num_steps: int,
              solver: str = "euler") -> jax.Array:
  """Integrates dx/dt = v(x, t) from t = 1 (x1, noise) to t = 0.

  Args:
    velocity_fn: `(x [B, ...], t [B]) -> [B, ...]`.
    x1: `[B, ...]` the state at t = 1.
    num_steps: uniform steps (`time_grid`); velocity evaluations are
      `num_steps` for Euler, `2 * num_steps` for Heun.
    solver: 'euler' | 'heun'.

  Returns:
    `[B, ...]` the state at t = 0.
  """
  if solver not in STEPS:
    raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
  step = STEPS[solver]
  times = time_grid(num_steps)

  def body(x, ts):
    return step(velocity_fn, x, ts[0], ts[1]), None

  x0, _ = jax.lax.scan(body, x1, (times[:-1], times[1:]))
  return x0


def guide(v_cond: jax.Array, v_null: jax.Array, scale: float) -> jax.Array:
  """Classifier-free guidance: `v_null + scale * (v_cond - v_null)`.

  scale 1 is the conditional velocity, 0 the unconditional one; > 1
  extrapolates away from the unconditional model.
  """
  return v_null + scale * (v_cond - v_null)
