"""One pure GAN training step: a discriminator update, then a generator update.

`train_step` knows nothing about devices. Bound with `functools.partial`, the
same function runs under `jit` (global batch, `axis_name=None`) or under
`pmap` / `shard_map` (per-device batch, `axis_name='data'`, gradients averaged
with `lax.pmean`); see `medgen_jax.train.parallel`.

Randomness is drawn for the *global* batch and sliced per device, so latent
noise and augmentation of example i are the same in every parallel mode and
the modes produce the same parameters. (Model-internal 'dropout' streams are
folded with the device index instead, so those, e.g. condition dropout, match
the single-device run only in distribution.)
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from medgen_jax import classifier
from medgen_jax.train import augment as augment_lib
from medgen_jax.train import ema as ema_lib
from medgen_jax.train import losses
from medgen_jax.train import state as state_lib
from medgen_jax.train.state import Models, TrainState

Batch = dict[str, jax.Array]


def _apply(module, params, model_state, *args, train: bool, rngs, **kwargs):
  """module.apply that threads non-param collections (e.g. spectral norm stats)."""
  variables = {"params": params, **model_state}
  if train and model_state:
    out, updates = module.apply(variables, *args, train=True, rngs=rngs,
                                mutable=list(model_state), **kwargs)
    return out, {**model_state, **updates}
  return module.apply(variables, *args, train=train, rngs=rngs, **kwargs), model_state


def _score(D, d_params, d_state, images, cond, *, rngs, condition_weight: float):
  """D's logits [B], its condition predictions (None without the auxiliary
  loss) and its updated state."""
  if not condition_weight:
    logits, d_state = _apply(D, d_params, d_state, images, cond, train=True, rngs=rngs)
    return logits, None, d_state
  (logits, predictions), d_state = _apply(D, d_params, d_state, images, cond,
                                          train=True, rngs=rngs, with_predictions=True)
  return logits, predictions, d_state


def condition_weight(loss_config: Any) -> float:
  """Weight of the AC-GAN condition-prediction loss (0 = off)."""
  return float(loss_config.condition_weight)


def _local_slice(tree: Any, axis_name: str | None, local_batch: int) -> Any:
  """This device's rows of arrays drawn for the global batch (identity under jit)."""
  if axis_name is None:
    return tree
  start = lax.axis_index(axis_name) * local_batch
  return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, local_batch, axis=0), tree)


def _device_key(key: jax.Array, axis_name: str | None) -> jax.Array:
  return key if axis_name is None else jax.random.fold_in(key, lax.axis_index(axis_name))


def _pmean(tree: Any, axis_name: str | None) -> Any:
  if axis_name is None:
    return tree
  return jax.tree.map(
      lambda x: lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def conditions_of(batch: Batch) -> dict[str, jax.Array]:
  """The condition entries of a batch: every entry except 'image'.

  The loop keeps only 'image' and the DatasetInfo condition fields.
  """
  return {k: v for k, v in batch.items() if k != "image"}


def penalties_on(loss_config: Any) -> bool:
  """Whether any zero-centred gradient penalty (R1 or R2) is configured."""
  return ((loss_config.r1_gamma > 0 or loss_config.r2_gamma > 0)
          and loss_config.r1_every > 0)


def r1_due(loss_config: Any, step: int) -> bool:
  """Whether host step `step` is a lazy-penalty step: R1 and R2 share the
  `r1_every` interval (static `with_r1` for the step fns)."""
  return penalties_on(loss_config) and step % loss_config.r1_every == 0


def train_step(state: TrainState, batch: Batch, rng: jax.Array | None = None, *,
               models: Models, loss_config: Any, latent_dim: int,
               axis_name: str | None = None,
               with_r1: bool | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One D update (with lazy R1 on steps divisible by r1_every), one G update, EMA.

  Args:
    state: the current TrainState (replicated across devices).
    batch: 'image' `[batch, *spatial, C]` in [-1, 1] plus condition arrays
      `[batch]`; the per-device part under pmap/shard_map.
    rng: step key; None uses fold_in(state.rng, state.step).
    models: networks and optimisers (static).
    loss_config: the `config.loss` section (static).
    latent_dim: the generator's noise size (`model.latent_dim`; static).
    axis_name: mesh axis the batch is split over, or None under jit.
    with_r1: static switch of the lazy penalties, R1 and R2 together (see
      `r1_due`); None decides from `state.step`
      on device with `lax.cond` (one executable, but XLA:CPU runs the
      conditional's body ~3x slower; measured in commit c95b331).

  Returns:
    (new state, metrics): scalar d_loss, g_loss, r1, r2, d_real, d_fake,
    d_grad_norm, g_grad_norm and bool is_finite; with `loss.condition_weight`
    > 0 also d_cond and g_cond (D's condition-prediction loss on real and on
    generated images; d_loss and g_loss stay the adversarial terms alone);
    with `loss.diversity_weight` > 0 also g_diversity (`losses.diversity_ratio`);
    with `loss.teacher_weight` > 0 also g_teacher (the frozen condition
    classifier's loss on the generated images, `classifier.condition_loss`).
  """
  lcfg = loss_config
  gan = losses.get_gan_loss(lcfg.gan)
  policy = lcfg.augment
  if rng is None:
    rng = jax.random.fold_in(state.rng, state.step)
  real = batch["image"]
  cond = conditions_of(batch)
  local_b, spatial = real.shape[0], real.shape[1:-1]
  global_b = local_b * (1 if axis_name is None else lax.axis_size(axis_name))
  keys = jax.random.split(rng, 8)
  G, D = models.generator, models.discriminator

  # Global draws, then this device's rows: identical results in every mode.
  z_d, z_g = (jax.random.normal(k, (global_b, latent_dim)) for k in keys[:2])
  aug = [augment_lib.sample_params(k, policy, global_b, spatial) for k in keys[2:5]]
  z_d, z_g, aug_real, aug_fake_d, aug_fake_g = _local_slice(
      (z_d, z_g, *aug), axis_name, local_b)
  drop_gd, drop_g, drop_d = (_device_key(k, axis_name) for k in keys[5:8])

  # Discriminator update.
  fake_d, g_state = _apply(G, state.g_params, state.g_state, z_d, cond, train=True,
                           rngs={"dropout": drop_gd})
  fake_d = lax.stop_gradient(fake_d)
  real_aug = augment_lib.apply_params(real, aug_real, policy)
  fake_aug = augment_lib.apply_params(fake_d, aug_fake_d, policy)
  d_params, d_opt_state, d_state, d_grad, d_metrics = discriminator_update(
      state, real_aug, fake_aug, cond, models=models, loss_config=lcfg,
      dropout_key=drop_d, axis_name=axis_name, with_r1=with_r1)

  # Generator update against the updated discriminator.
  cond_weight = condition_weight(lcfg)
  div_weight = float(lcfg.diversity_weight)
  teacher_weight = float(lcfg.teacher_weight)
  if teacher_weight and models.teacher is None:
    raise ValueError("loss.teacher_weight > 0 needs Models.teacher (the loop "
                     "builds it with train.loop.build_teacher)")

  real_logits, d_state = paired_real_logits(gan, D, d_params, d_state, real_aug, cond,
                                            dropout_key=drop_d)
  teacher_real = (teacher_field_losses(models.teacher, real, cond)
                  if teacher_weight and lcfg.teacher_margin == "real" else None)

  def g_objective(g_params):
    fake, new_g_state = _apply(G, g_params, g_state, z_g, cond, train=True,
                               rngs={"dropout": drop_g})
    fake_aug = augment_lib.apply_params(fake, aug_fake_g, policy)
    logits, predictions, new_d_state = _score(
        D, d_params, d_state, fake_aug, cond, rngs={"dropout": drop_d},
        condition_weight=cond_weight)
    g_metrics = dict(g_loss=gan.g(logits, real_logits))
    if cond_weight:
      g_metrics["g_cond"] = losses.condition_prediction_loss(predictions, cond, D.conditions)
    total = g_metrics["g_loss"] + cond_weight * g_metrics.get("g_cond", 0.0)
    if teacher_weight:
      # The frozen classifier sees the un-augmented sample, as it saw reals.
      fake_losses = teacher_field_losses(models.teacher, fake, cond)
      g_metrics["g_teacher"] = sum(fake_losses.values())
      push = g_metrics["g_teacher"]
      if teacher_real is not None:
        g_metrics["g_teacher_real"] = sum(teacher_real.values())
        push = losses.teacher_hinge(fake_losses, teacher_real)
      total = total + teacher_weight * push
    if div_weight:
      # The D step's sample used the same parameters and conditions with
      # other noise, so the mode-seeking pair costs no extra forward pass.
      g_metrics["g_diversity"] = losses.diversity_ratio(
          fake, fake_d, z_g, z_d, float(lcfg.diversity_cap))
      total = total - div_weight * g_metrics["g_diversity"]
    return total, (new_g_state, new_d_state, g_metrics)

  (_, (g_state, d_state, g_metrics)), g_grad = jax.value_and_grad(
      g_objective, has_aux=True)(state.g_params)
  g_grad, g_metrics, g_state, d_state = _pmean((g_grad, g_metrics, g_state, d_state),
                                               axis_name)
  return finish_step(state, models=models, loss_config=lcfg, g_grad=g_grad,
                     g_state=g_state, d_params=d_params, d_state=d_state,
                     d_opt_state=d_opt_state, d_grad=d_grad,
                     metrics=dict(d_metrics, **g_metrics))


def trainer_hooks(config: Any, models: Models, info: Any) -> dict[str, Callable]:
  """kwargs for `parallel.build_trainer`: the GAN step on its loss section
  and the TrainState init."""
  return dict(step_fn=functools.partial(train_step, loss_config=config.loss,
                                        latent_dim=config.model.latent_dim),
              init_fn=state_lib.make_init_fn(models, info, latent_dim=config.model.latent_dim,
                                             seed=config.train.seed))


def teacher_field_losses(teacher_model, images: jax.Array, cond: dict[str, jax.Array]
                         ) -> dict[str, jax.Array]:
  """{field: the frozen teacher's loss on `images` for `cond`} (un-augmented
  images, as the teacher saw reals in training)."""
  teacher, teacher_params = teacher_model
  _, metrics = classifier.condition_loss(teacher, teacher_params, images,
                                         classifier.condition_targets(cond, teacher.fields))
  return {f.name: metrics[f"{f.name}_loss"] for f in teacher.fields}


def paired_real_logits(gan: losses.GanLoss, D, d_params, d_state, real_in: jax.Array,
                       cond: dict[str, jax.Array], *, dropout_key: jax.Array):
  """The real halves of the D step's pairs, scored by the updated D, for a
  relativistic G loss (fake i is compared with real i, which shares its
  conditions); (None, d_state) for the other losses.

  Returns:
    (real logits `[batch]` or None, D's updated state).
  """
  if not gan.relativistic:
    return None, d_state
  return _apply(D, d_params, d_state, real_in, cond, train=True,
                rngs={"dropout": dropout_key})


def discriminator_update(state: TrainState, real_in: jax.Array, fake_in: jax.Array,
                         cond: dict[str, jax.Array], *, models: Models,
                         loss_config: Any, dropout_key: jax.Array,
                         axis_name: str | None, with_r1: bool | None = None):
  """One D optimiser step on (augmented) real and fake inputs.

  Lazy R1 on the real inputs and R2 on the fake inputs (each scaled by
  `r1_every`; weights `loss.r1_gamma` / `loss.r2_gamma`) run when `with_r1`;
  with `with_r1=None` on steps divisible by `r1_every`, chosen on device with
  `lax.cond`. Real input i and fake input i are a pair for relativistic
  losses (the fake was generated from real i's conditions). Shared by the
  generation step and the paired translation step.

  Returns:
    (d_params, d_opt_state, d_state, d_grad, metrics) with metrics d_loss, r1,
    r2, d_real, d_fake averaged over `axis_name`.
  """
  D, gan = models.discriminator, losses.get_gan_loss(loss_config.gan)
  use_penalty = penalties_on(loss_config)
  every = int(loss_config.r1_every)
  r1_weight = losses.lazy_penalty_weight(loss_config.r1_gamma, every) if use_penalty else 0.0
  r2_weight = losses.lazy_penalty_weight(loss_config.r2_gamma, every) if use_penalty else 0.0
  cond_weight = condition_weight(loss_config)
  zero = jnp.zeros((), jnp.float32)

  def d_objective(d_params, with_r1: bool):
    def d_real(x):
      logits, predictions, d_state = _score(
          D, d_params, state.d_state, x, cond, rngs={"dropout": dropout_key},
          condition_weight=cond_weight)
      return logits, (d_state, predictions)
    if with_r1 and r1_weight:
      r1, real_logits, (d_state, predictions) = losses.gradient_penalty(d_real, real_in)
    else:
      (real_logits, (d_state, predictions)), r1 = d_real(real_in), zero

    def d_fake(x):
      return _apply(D, d_params, d_state, x, cond, train=True,
                    rngs={"dropout": dropout_key})
    if with_r1 and r2_weight:
      r2, fake_logits, d_state = losses.gradient_penalty(d_fake, fake_in)
    else:
      (fake_logits, d_state), r2 = d_fake(fake_in), zero
    loss = gan.d(real_logits, fake_logits)
    aux = dict(d_loss=loss, r1=r1, r2=r2, d_real=jnp.mean(real_logits),
               d_fake=jnp.mean(fake_logits))
    total = loss + r1_weight * r1 + r2_weight * r2
    if cond_weight:
      # Heads learn from real images only: training them on fakes too (the
      # original AC-GAN) rewards D for classifying the generator's mistakes.
      aux["d_cond"] = losses.condition_prediction_loss(predictions, cond, D.conditions)
      total = total + cond_weight * aux["d_cond"]
    return total, (aux, d_state)

  def d_grads(with_r1: bool):
    return jax.grad(d_objective, has_aux=True)(state.d_params, with_r1)

  if use_penalty and with_r1 is not None:
    d_grad, (d_metrics, d_state) = d_grads(bool(with_r1))
  elif use_penalty:
    d_grad, (d_metrics, d_state) = lax.cond(
        state.step % loss_config.r1_every == 0, lambda: d_grads(True),
        lambda: d_grads(False))
  else:
    d_grad, (d_metrics, d_state) = d_grads(False)
  d_grad, d_metrics, d_state = _pmean((d_grad, d_metrics, d_state), axis_name)
  d_updates, d_opt_state = models.d_tx.update(d_grad, state.d_opt_state, state.d_params)
  d_params = optax.apply_updates(state.d_params, d_updates)
  return d_params, d_opt_state, d_state, d_grad, d_metrics


def finish_step(state: TrainState, *, models: Models, loss_config: Any, g_grad,
                g_state, d_params, d_state, d_opt_state, d_grad,
                metrics: dict[str, jax.Array]
                ) -> tuple[TrainState, dict[str, jax.Array]]:
  """Applies the (already averaged) G gradient, updates the EMA, adds grad norms
  and the is_finite flag to `metrics`, and returns the next state."""
  g_updates, g_opt_state = models.g_tx.update(g_grad, state.g_opt_state, state.g_params)
  g_params = optax.apply_updates(state.g_params, g_updates)
  metrics = dict(metrics, d_grad_norm=optax.global_norm(d_grad),
                 g_grad_norm=optax.global_norm(g_grad))
  metrics["is_finite"] = jnp.all(jnp.isfinite(jnp.stack(list(metrics.values()))))
  new_state = state.replace(
      step=state.step + 1, g_params=g_params, g_state=g_state, d_params=d_params,
      d_state=d_state, ema_params=ema_lib.ema_update(state.ema_params, g_params,
                                                     loss_config.ema_decay),
      g_opt_state=g_opt_state, d_opt_state=d_opt_state)
  return new_state, metrics
