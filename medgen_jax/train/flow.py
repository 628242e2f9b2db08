"""Conditional flow matching (config.task = 'flow') on the GAN's training loop.

The objective (rectified flow / SD3 conventions, t = 1 is noise):

  x_t = (1 - t) x_0 + t eps,    eps ~ N(0, I),  x_0 a data batch in [-1, 1]
  target velocity  v* = dx_t/dt = eps - x_0
  loss = mean over examples and voxels of (v_theta(x_t, t, c) - v*)^2

Time distribution: logit-normal, `t = sigmoid(m + s n)`, n ~ N(0, 1)
(`loss.time_mean` m, `loss.time_std` s; SD3 found m = 0, s = 1 the best of
its samplers): it puts more training on intermediate t, where the velocity
is hardest to predict, than uniform t does.

Condition dropout for classifier-free guidance: each example's conditions
are all replaced by unknown (-1 / NaN: the condition embedding's null
vectors) with probability `loss.cfg_dropout`, so one network learns the
conditional and the unconditional velocity.

Settings: `config.loss` is the flow loss section (`LOSS_KEYS`, built by
`configs/common.py` `flow_loss_section`), with no discriminator or teacher
term. State: `FlowState`, the velocity network (`models.velocity.
FlowGenerator`), its EMA in `ema_params` and its optimiser; checkpoints
restore with the GAN's code, and the EMA generator is read by
`inference.sample` exactly as for a GAN run.

Noise, times and dropout are drawn for the global batch and sliced per
device (`step._local_slice`), so jit / pmap / shard_map give the same
parameters, as for the GAN step.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from medgen_jax.data.info import DatasetInfo
from medgen_jax.models.velocity import null_conditions
from medgen_jax.train import ema as ema_lib
from medgen_jax.train import state as state_lib
from medgen_jax.train import step as step_lib

TASKS = ("flow",)
# Every key of a flow run's `config.loss` (configs/common.py flow_loss_section).
LOSS_KEYS = ("time_mean", "time_std", "cfg_dropout", "ema_decay")


@flax.struct.dataclass
class FlowState:
  """Everything that changes while a velocity network trains.

  Attributes:
    step: int32 scalar, number of completed train steps.
    g_params / g_state: the velocity network's 'params' and other collections.
    ema_params: EMA of `g_params`, used for sampling.
    g_opt_state: its optax state.
    rng: base PRNG key (uint32 [2]); step t uses fold_in(rng, t).
  """
  step: jax.Array
  g_params: Any
  g_state: Any
  ema_params: Any
  g_opt_state: Any
  rng: jax.Array


def sample_time(key: jax.Array, n: int, *, mean: float = 0.0, std: float = 1.0) -> jax.Array:
  """`[n]` logit-normal times: sigmoid(mean + std * N(0, 1)), in (0, 1)."""
  return jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,), jnp.float32))


def _per_example(t: jax.Array, x: jax.Array) -> jax.Array:
  """`[B]` -> `[B, 1, ..., 1]` broadcasting against x."""
  return t.reshape((-1,) + (1,) * (x.ndim - 1))


def interpolate(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t) x0 + t eps; x0, eps `[B, ...]`, t `[B]`."""
  t = _per_example(t, x0)
  return (1.0 - t) * x0 + t * eps


def velocity_target(x0: jax.Array, eps: jax.Array) -> jax.Array:
  """d x_t / dt of the linear path: eps - x0 (independent of t)."""
  return eps - x0


def flow_matching_loss(v_pred: jax.Array, x0: jax.Array, eps: jax.Array) -> jax.Array:
  """Mean squared error of the predicted velocity against eps - x0 (a scalar)."""
  return jnp.mean(jnp.square(v_pred.astype(jnp.float32) - velocity_target(x0, eps)))


def drop_conditions(conditions: Mapping[str, jax.Array], drop: jax.Array
                    ) -> dict[str, jax.Array]:
  """Example i's conditions all set to unknown where `drop[i]` (bool `[B]`)."""
  null = null_conditions(conditions)
  return {k: jnp.where(drop, null[k], v) for k, v in conditions.items()}


def flow_step(state: FlowState, batch: dict[str, jax.Array],
              rng: jax.Array | None = None, *, models: state_lib.Models, loss_config: Any,
              axis_name: str | None = None, with_r1: bool | None = None
              ) -> tuple[FlowState, dict[str, jax.Array]]:
  """One velocity-network update and the EMA.

  Args:
    state: FlowState (replicated).
    batch: 'image' `[batch, *spatial, C]` in [-1, 1] and condition arrays
      `[batch]`; the per-device part under pmap / shard_map.
    rng: step key; None uses fold_in(state.rng, state.step).
    models: `Models` with the FlowGenerator (static).
    loss_config: the flow loss section (time_mean, time_std, cfg_dropout,
      ema_decay).
    axis_name: mesh axis the batch is split over, or None under jit.
    with_r1: ignored (no discriminator); the loop's static switch is part of
      the step signature all tasks share.

  Returns:
    (new state, metrics): flow_loss, g_grad_norm, is_finite.
  """
  del with_r1
  lcfg = loss_config
  if rng is None:
    rng = jax.random.fold_in(state.rng, state.step)
  x0 = batch["image"]
  cond = step_lib.conditions_of(batch)
  local_b = x0.shape[0]
  global_b = local_b * (1 if axis_name is None else lax.axis_size(axis_name))
  k_time, k_noise, k_drop, k_model = jax.random.split(rng, 4)
  t = sample_time(k_time, global_b, mean=float(lcfg.time_mean), std=float(lcfg.time_std))
  eps = jax.random.normal(k_noise, (global_b,) + x0.shape[1:], jnp.float32)
  drop = jax.random.bernoulli(k_drop, float(lcfg.cfg_dropout), (global_b,))
  t, eps, drop = step_lib._local_slice((t, eps, drop), axis_name, local_b)  # pylint: disable=protected-access
  cond = drop_conditions(cond, drop)
  x_t = interpolate(x0, eps, t)
  dropout_key = step_lib._device_key(k_model, axis_name)  # pylint: disable=protected-access
  G = models.generator

  def objective(params):
    v = G.apply({"params": params, **state.g_state}, x_t, t, cond, train=True,
                rngs={"dropout": dropout_key}, method="velocity")
    return flow_matching_loss(v, x0, eps)

  loss, grad = jax.value_and_grad(objective)(state.g_params)
  loss, grad = step_lib._pmean((loss, grad), axis_name)  # pylint: disable=protected-access
  updates, g_opt_state = models.g_tx.update(grad, state.g_opt_state, state.g_params)
  g_params = optax.apply_updates(state.g_params, updates)
  metrics = dict(flow_loss=loss, g_grad_norm=optax.global_norm(grad))
  metrics["is_finite"] = jnp.all(jnp.isfinite(jnp.stack(list(metrics.values()))))
  new_state = state.replace(
      step=state.step + 1, g_params=g_params, g_opt_state=g_opt_state,
      ema_params=ema_lib.ema_update(state.ema_params, g_params, lcfg.ema_decay))
  return new_state, metrics


def make_init_fn(models: state_lib.Models, info: DatasetInfo,
                 config: Any) -> Callable[[], FlowState]:
  """Pure () -> FlowState: the velocity network's parameters and optimiser."""
  G = models.generator

  def init() -> FlowState:
    rng = jax.random.PRNGKey(config.train.seed)
    rng, k_params, k_dropout = jax.random.split(rng, 3)
    variables = G.init({"params": k_params, "dropout": k_dropout},
                       jnp.zeros((1,) + tuple(info.image_shape), jnp.float32),
                       jnp.ones((1,), jnp.float32), state_lib.dummy_conditions(info, 1),
                       train=False, method="velocity")
    g_params, g_state = state_lib._split_variables(variables)  # pylint: disable=protected-access
    return FlowState(
        step=jnp.zeros((), jnp.int32), g_params=g_params, g_state=g_state,
        ema_params=jax.tree.map(jnp.copy, g_params),
        g_opt_state=models.g_tx.init(g_params), rng=rng)
  return init


def validate_flow_config(config: Any) -> None:
  """Flow-specific checks with one clear ValueError, before anything compiles."""
  m, lcfg = config.model, config.loss
  if m.generator != "flow":
    raise ValueError(f"config.task 'flow' trains model.generator 'flow', got "
                     f"{m.generator!r}")
  extra = sorted(set(lcfg) - set(LOSS_KEYS))
  if extra:
    raise ValueError(f"config.task 'flow' has no discriminator or teacher: loss {extra} "
                     f"are not flow settings (the flow loss section has {list(LOSS_KEYS)}; "
                     f"configs/common.py flow_loss_section)")
  missing = sorted(set(LOSS_KEYS) - set(lcfg))
  if missing:
    raise ValueError(f"config.loss lacks the flow settings {missing} "
                     f"(configs/common.py flow_loss_section)")
  if not float(lcfg.time_std) > 0:
    raise ValueError(f"loss.time_std must be > 0, got {lcfg.time_std}")
  if not 0.0 <= float(lcfg.cfg_dropout) < 1.0:
    raise ValueError(f"loss.cfg_dropout must be in [0, 1), got {lcfg.cfg_dropout}")
  if not 0.0 <= float(lcfg.ema_decay) < 1.0:
    raise ValueError(f"loss.ema_decay must be in [0, 1), got {lcfg.ema_decay}")


def trainer_hooks(config: Any, models: state_lib.Models,
                  info: DatasetInfo) -> dict[str, Any]:
  """kwargs for `parallel.build_trainer`: the flow step on its loss section and its init."""
  validate_flow_config(config)
  return dict(step_fn=functools.partial(flow_step, loss_config=config.loss),
              init_fn=make_init_fn(models, info, config))
