"""The training state pytree, the optimisers and the state initialiser.

`TrainState` holds everything a resumed run needs (both networks, the EMA
generator, both optimiser states, the step and the base RNG); checkpointing it
together with the data iterator state makes a resume exact.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from medgen_jax.data.info import CATEGORICAL, DatasetInfo

# Collections created by `init` that are not training state (sown attention q/k).
_NOT_STATE = ("params", "intermediates")


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: int32 scalar, number of completed train steps.
    g_params / d_params: generator / discriminator 'params' collections.
    g_state / d_state: their other mutable collections (e.g. spectral norm's
      'batch_stats'); empty dicts when a model has none.
    ema_params: EMA of `g_params`, used for sampling.
    g_opt_state / d_opt_state: optax states.
    rng: base PRNG key (uint32 [2]); step t uses fold_in(rng, t).
  """
  step: jax.Array
  g_params: Any
  g_state: Any
  d_params: Any
  d_state: Any
  ema_params: Any
  g_opt_state: Any
  d_opt_state: Any
  rng: jax.Array


class Models(NamedTuple):
  """The networks and their optimisers; static, closed over by the train step.

  `teacher` is an optional frozen condition classifier `(FeatureNet, params)`
  scoring generated images for `loss.teacher_weight`; it is trained once per
  dataset and cached, never updated, so it is not part of the TrainState.
  """
  generator: nn.Module
  discriminator: nn.Module
  g_tx: optax.GradientTransformation
  d_tx: optax.GradientTransformation
  teacher: Any = None


def make_schedule(lr: float, optim_config: Any, num_steps: int) -> optax.Schedule:
  """'constant' (with optional linear warmup) or 'cosine' (warmup then cosine decay to 0)."""
  warmup = int(optim_config.warmup_steps)
  name = optim_config.schedule
  if name == "constant":
    if warmup <= 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, warmup + 1))
  raise ValueError(f"unknown optim.schedule {name!r}; expected 'constant' or 'cosine'")


def make_optimizer(lr: float, optim_config: Any, num_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping (if grad_clip > 0) then Adam(b1, b2) on the schedule."""
  parts = []
  clip = float(optim_config.grad_clip or 0.0)
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(optax.adam(make_schedule(lr, optim_config, num_steps),
                          b1=optim_config.b1, b2=optim_config.b2))
  return optax.chain(*parts)


def make_models(generator: nn.Module, discriminator: nn.Module | None, config: Any, *,
                teacher: Any = None) -> Models:
  """Bundles the networks with TTUR optimisers (separate G and D learning rates).

  Without a discriminator (flow matching) there is no D optimiser and
  `optim.d_lr` is not read.
  """
  n = config.train.num_steps
  d_tx = (None if discriminator is None
          else make_optimizer(config.optim.d_lr, config.optim, n))
  return Models(generator, discriminator,
                make_optimizer(config.optim.g_lr, config.optim, n), d_tx, teacher)


def dummy_conditions(info: DatasetInfo, batch: int) -> dict[str, jax.Array]:
  """Valid condition arrays `[batch]` for shape inference at init."""
  return {f.name: (jnp.zeros((batch,), jnp.int32) if f.kind == CATEGORICAL
                   else jnp.zeros((batch,), jnp.float32))
          for f in info.conditions}


def _split_variables(variables: Any) -> tuple[Any, dict]:
  variables = flax.core.unfreeze(nn.unbox(variables))
  other = {k: v for k, v in variables.items() if k not in _NOT_STATE}
  return variables["params"], other


def make_init_fn(models: Models, info: DatasetInfo, *, latent_dim: int,
                 seed: int, example_inputs: tuple[tuple, tuple] | None = None
                 ) -> Callable[[], TrainState]:
  """A pure function () -> TrainState, meant for `jax.eval_shape` and `jax.jit`.

  `example_inputs` = (generator args, discriminator args) for a batch of one;
  None = ((z, conditions), (images, conditions)) of the generation task
  (translation passes (sources, conditions), (pairs, conditions)).
  """
  def init() -> TrainState:
    rng = jax.random.PRNGKey(seed)
    rng, kg, kd, kgd, kdd = jax.random.split(rng, 5)
    if example_inputs is None:
      cond = dummy_conditions(info, 1)
      g_args = (jnp.zeros((1, latent_dim), jnp.float32), cond)
      d_args = (jnp.zeros((1,) + tuple(info.image_shape), jnp.float32), cond)
    else:
      g_args, d_args = example_inputs
    g_params, g_state = _split_variables(
        models.generator.init({"params": kg, "dropout": kgd}, *g_args, train=False))
    d_params, d_state = _split_variables(
        models.discriminator.init({"params": kd, "dropout": kdd}, *d_args, train=False))
    return TrainState(
        step=jnp.zeros((), jnp.int32), g_params=g_params, g_state=g_state,
        d_params=d_params, d_state=d_state,
        ema_params=jax.tree.map(jnp.copy, g_params),
        g_opt_state=models.g_tx.init(g_params), d_opt_state=models.d_tx.init(d_params),
        rng=rng)
  return init
