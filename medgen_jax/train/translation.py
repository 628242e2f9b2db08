"""Paired image-to-image training (config.task = 'translation'), pix2pix style.

The batch 'image' carries every modality as a channel (e.g. CT, PET); the
config names which are sources and which the target. One step:

  D update: D(source ++ target) real vs D(source ++ G(source)) fake (a
    conditional discriminator on pairs), lazy R1 on real pairs;
  G update: GAN loss of D(source ++ G(source)) + recon_weight * L1(G(source),
    target) in model range [-1, 1];
  EMA of G.

Augmentation is applied to the concatenated pair, so source and target move
together. The step reuses `medgen_jax.train.step`'s parameter threading and
cross-device helpers, so it runs under jit / pmap / shard_map through
`parallel.build_trainer` (`trainer_hooks`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from medgen_jax.data.info import DatasetInfo
from medgen_jax.models.translator import source_target_names, split_modalities
from medgen_jax.train import augment as augment_lib
from medgen_jax.train import losses
from medgen_jax.train import state as state_lib
from medgen_jax.train import step as step_lib

TASKS = ("generation", "translation")


def split_pair(images: jax.Array, model_config: Any, info: DatasetInfo
               ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """Splits `[B, *spatial, C]` into sources and target.

  Returns:
    (sources {name: [B, *spatial, 1]}, stacked sources [B, *spatial, S],
    target [B, *spatial, T]), channels in `model_config`'s order.
  """
  src, tgt = source_target_names(model_config, info)
  sources = split_modalities(images, info.modalities, src)
  target = jnp.concatenate(
      list(split_modalities(images, info.modalities, tgt).values()), -1)
  return sources, jnp.concatenate([sources[n] for n in src], -1), target


def validate_translation_config(config: Any, info: DatasetInfo) -> None:
  """Translation-specific checks with one clear ValueError."""
  source_target_names(config.model, info)
  if float(config.loss.recon_weight) < 0:
    raise ValueError(f"loss.recon_weight must be >= 0 for translation, got "
                     f"{config.loss.recon_weight}")
  rate = float(config.model.modality_dropout)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"model.modality_dropout must be in [0, 1), got {rate}")


def make_init_fn(models: state_lib.Models, info: DatasetInfo,
                 config: Any) -> Callable[[], state_lib.TrainState]:
  """Pure () -> TrainState for a translator G and a pair discriminator D."""
  cond = state_lib.dummy_conditions(info, 1)
  images = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  sources, src, tgt = split_pair(images, config.model, info)
  pair = jnp.concatenate([src, tgt], -1)
  return state_lib.make_init_fn(
      models, info, latent_dim=0, seed=config.train.seed,
      example_inputs=((sources, cond), (pair, cond)))


def translation_step(state: state_lib.TrainState, batch: dict[str, jax.Array],
                     rng: jax.Array | None = None, *, models: state_lib.Models,
                     loss_config: Any, model_config: Any, info: DatasetInfo,
                     axis_name: str | None = None, with_r1: bool | None = None
                     ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One pair-D update (lazy R1), one G update (GAN + L1), EMA.

  Args:
    state: TrainState (replicated).
    batch: 'image' `[batch, *spatial, C]` with source and target channels,
      plus condition arrays `[batch]`.
    rng: step key; None uses fold_in(state.rng, state.step).
    models, loss_config (`config.loss`), model_config (`config.model`:
      which channels are sources and target), info: static.
    axis_name: mesh axis of the batch, or None under jit.
    with_r1: static R1 switch, as in `step.train_step`.

  Returns:
    (new state, metrics): d_loss, g_loss (adversarial part), recon_l1, r1,
    d_real, d_fake, d_grad_norm, g_grad_norm, is_finite.
  """
  lcfg = loss_config
  gan = losses.get_gan_loss(lcfg.gan)
  policy = lcfg.augment
  recon_weight = float(lcfg.recon_weight)
  if rng is None:
    rng = jax.random.fold_in(state.rng, state.step)
  sources, src, target = split_pair(batch["image"], model_config, info)
  cond = step_lib.conditions_of(batch)
  local_b, spatial = src.shape[0], src.shape[1:-1]
  global_b = local_b * (1 if axis_name is None else lax.axis_size(axis_name))
  keys = jax.random.split(rng, 6)
  G, D = models.generator, models.discriminator
  aug = [augment_lib.sample_params(k, policy, global_b, spatial) for k in keys[:3]]
  aug_real, aug_fake_d, aug_fake_g = step_lib._local_slice(aug, axis_name, local_b)  # pylint: disable=protected-access
  drop_gd, drop_g, drop_d = (step_lib._device_key(k, axis_name) for k in keys[3:6])  # pylint: disable=protected-access
  apply = step_lib._apply  # pylint: disable=protected-access

  def pair(image):
    return jnp.concatenate([src, image], -1)

  fake, g_state = apply(G, state.g_params, state.g_state, sources, cond,
                        train=True, rngs={"dropout": drop_gd})
  fake = lax.stop_gradient(fake)
  real_aug = augment_lib.apply_params(pair(target), aug_real, policy)
  fake_aug = augment_lib.apply_params(pair(fake), aug_fake_d, policy)
  d_params, d_opt_state, d_state, d_grad, d_metrics = step_lib.discriminator_update(
      state, real_aug, fake_aug, cond, models=models, loss_config=lcfg,
      dropout_key=drop_d, axis_name=axis_name, with_r1=with_r1)

  real_logits, d_state = step_lib.paired_real_logits(gan, D, d_params, d_state, real_aug,
                                                     cond, dropout_key=drop_d)

  def g_objective(g_params):
    fake, new_g_state = apply(G, g_params, g_state, sources, cond, train=True,
                              rngs={"dropout": drop_g})
    fake_aug = augment_lib.apply_params(pair(fake), aug_fake_g, policy)
    logits, new_d_state = apply(D, d_params, d_state, fake_aug, cond, train=True,
                                rngs={"dropout": drop_d})
    adv = gan.g(logits, real_logits)
    recon = jnp.mean(jnp.abs(fake - target))
    return adv + recon_weight * recon, (adv, recon, new_g_state, new_d_state)

  (_, (g_loss, recon, g_state, d_state)), g_grad = jax.value_and_grad(
      g_objective, has_aux=True)(state.g_params)
  g_grad, g_loss, recon, g_state, d_state = step_lib._pmean(  # pylint: disable=protected-access
      (g_grad, g_loss, recon, g_state, d_state), axis_name)
  return step_lib.finish_step(
      state, models=models, loss_config=lcfg, g_grad=g_grad, g_state=g_state,
      d_params=d_params, d_state=d_state, d_opt_state=d_opt_state, d_grad=d_grad,
      metrics=dict(d_metrics, g_loss=g_loss, recon_l1=recon))


def trainer_hooks(config: Any, models: state_lib.Models,
                  info: DatasetInfo) -> dict[str, Any]:
  """kwargs for `parallel.build_trainer`: the translation step and init."""
  validate_translation_config(config, info)
  return dict(step_fn=functools.partial(translation_step, loss_config=config.loss,
                                        model_config=config.model, info=info),
              init_fn=make_init_fn(models, info, config))


def make_sample_fn(generator, config: Any, info: DatasetInfo, num: int = 8
                   ) -> Callable[[Any, Any, dict[str, np.ndarray]], jax.Array]:
  """(ema params, g_state, host batch) -> a 2-row grid: real | translated.

  Returns `[2 * n, *spatial, C]` in [-1, 1] with the data's channels
  (n = min(num, batch)): the first n are the real examples, the next n the same examples with the
  target channels replaced by the translation (row labels SAMPLE_ROWS), for
  `viz.save_grid(images, info, ...)`.
  """
  _, tgt = source_target_names(config.model, info)
  target_idx = [info.modalities.index(n) for n in tgt]

  @jax.jit
  def translate(params, model_state, images, cond):
    sources, _, _ = split_pair(images, config.model, info)
    fake = generator.apply({"params": params, **model_state}, sources, cond,
                           train=False)
    return images.at[..., jnp.asarray(target_idx)].set(fake)

  def sample(params, model_state, batch):
    images = jnp.asarray(batch["image"][:num])
    cond = {f.name: jnp.asarray(batch[f.name][:num]) for f in info.conditions}
    return jnp.concatenate([images, translate(params, model_state, images, cond)], 0)
  return sample


SAMPLE_ROWS = ("real", "translated")
