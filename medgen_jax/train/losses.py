"""GAN objectives and the zero-centred gradient penalties (R1 on reals, R2 on fakes).

Losses take discriminator logits `[batch]` and return scalars (means over the
batch), so the same function works on a global batch under `jit` and on a
per-device batch under `pmap`/`shard_map` (followed by `lax.pmean`).

The relativistic pairing loss (`rpgan`) compares real example i with fake
example i. The training step generates fake i from the conditions of real i,
so every pair shares its conditions and the conditional D scores both with
the same projection: pairs are formed within a condition, never across.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from medgen_jax import classifier
from medgen_jax.conditioning import rescale_continuous
from medgen_jax.data.info import CATEGORICAL, ConditionField


def d_loss_nonsaturating(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """-log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))), logits `[batch]`."""
  return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def g_loss_nonsaturating(fake_logits: jax.Array) -> jax.Array:
  """-log sigmoid(D(G(z))) (Goodfellow et al.'s non-saturating generator loss)."""
  return jnp.mean(jax.nn.softplus(-fake_logits))


def d_loss_hinge(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """max(0, 1 - D(x)) + max(0, 1 + D(G(z))) (Lim & Ye; used by SAGAN/BigGAN)."""
  return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def g_loss_hinge(fake_logits: jax.Array) -> jax.Array:
  """-D(G(z))."""
  return -jnp.mean(fake_logits)


def d_loss_rpgan(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """Relativistic pairing loss for D: mean_i softplus(-(D(x_i) - D(G(z_i)))).

  (Jolicoeur-Martineau 2019; with R1 and R2 the objective of R3GAN, Huang et
  al., NeurIPS 2024.) Real i and fake i form a pair, so both `[batch]` logits
  must come from examples in the same order.
  """
  return jnp.mean(jax.nn.softplus(fake_logits - real_logits))


def g_loss_rpgan(fake_logits: jax.Array, real_logits: jax.Array) -> jax.Array:
  """Relativistic pairing loss for G: mean_i softplus(-(D(G(z_i)) - D(x_i)))."""
  return jnp.mean(jax.nn.softplus(real_logits - fake_logits))


class GanLoss(NamedTuple):
  """d(real_logits, fake_logits) and g(fake_logits, real_logits).

  `relativistic` losses need the logits of the paired real examples in the
  generator loss too; the others ignore `real_logits` (pass None).
  """
  d: Callable[[jax.Array, jax.Array], jax.Array]
  g: Callable[..., jax.Array]
  relativistic: bool = False


GAN_LOSSES: dict[str, GanLoss] = {
    "nonsaturating": GanLoss(d_loss_nonsaturating,
                             lambda fake, real=None: g_loss_nonsaturating(fake)),
    "hinge": GanLoss(d_loss_hinge, lambda fake, real=None: g_loss_hinge(fake)),
    "rpgan": GanLoss(d_loss_rpgan, g_loss_rpgan, relativistic=True),
}


def get_gan_loss(name: str) -> GanLoss:
  if name not in GAN_LOSSES:
    raise ValueError(f"unknown loss.gan {name!r}; expected one of {sorted(GAN_LOSSES)}")
  return GAN_LOSSES[name]


def gradient_penalty(d_fn: Callable[[jax.Array], tuple[jax.Array, Any]],
                     images: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
  """Zero-centred penalty: mean over the batch of ||d D(x) / d x||^2.

  On real images it is R1 (Mescheder et al. 2018), on generated images R2
  (Roth et al. 2017; R3GAN penalises both). The discriminator forward pass
  is shared with the loss term via `jax.vjp`, so the penalty costs one extra
  backward pass, not an extra forward.
  The gradient of sum(logits) w.r.t. the images is the per-example gradient
  when examples do not interact inside D; with D's minibatch-std channel
  they interact weakly through the group statistic, and this is then the
  gradient StyleGAN2's R1 takes too.

  Args:
    d_fn: images `[batch, *spatial, C]` -> (logits `[batch]`, aux).
    images: `[batch, *spatial, C]`.

  Returns:
    (penalty scalar (without gamma/2), logits `[batch]`, aux).
  """
  logits, vjp_fn, aux = jax.vjp(d_fn, images, has_aux=True)
  (grads,) = vjp_fn(jnp.ones_like(logits))
  per_example = jnp.sum(jnp.square(grads).reshape(grads.shape[0], -1), axis=-1)
  return jnp.mean(per_example), logits, aux


def lazy_penalty_weight(gamma: float, every: int) -> float:
  """Weight of an R1 / R2 term on the steps it is applied (StyleGAN2's lazy
  regularisation).

  The penalty gamma/2 * R applied only every k steps is scaled by k so its
  average strength matches applying it every step.
  """
  return 0.5 * gamma * every


def condition_prediction_loss(predictions: dict[str, jax.Array],
                              conditions: dict[str, jax.Array],
                              fields: Sequence[ConditionField]) -> jax.Array:
  """AC-GAN auxiliary loss: how badly D's heads predict the given conditions.

  Sum over fields of the per-example loss averaged over the batch: softmax
  cross-entropy for categorical fields, squared error in [-1, 1]-rescaled
  units for continuous ones. Unknown values (-1 / NaN) contribute zero but
  still count in the batch size, so the mean is linear in the examples and a
  `pmean` of per-device values equals the global-batch value.

  Args:
    predictions: field -> [B, num_classes] logits or [B] rescaled value (D's
      `with_predictions` output).
    conditions: field -> [B] int class (-1 unknown) or float value (NaN).
    fields: the condition fields (`DatasetInfo.conditions`).

  Returns:
    Scalar loss.
  """
  total = jnp.zeros((), jnp.float32)
  for field in fields:
    target = conditions[field.name]
    if field.kind != CATEGORICAL:  # [lo, hi] -> [-1, 1]; unknown stays NaN
      known, scaled = rescale_continuous(target, *field.value_range)
      target = jnp.where(known, scaled, jnp.nan)
    per_example, _ = classifier.per_example_condition_loss(
        field.kind, predictions[field.name], target)
    total = total + jnp.mean(per_example)
  return total


TEACHER_MARGINS = ("none", "real")


def teacher_hinge(fake_losses: Mapping[str, jax.Array],
                  real_losses: Mapping[str, jax.Array]) -> jax.Array:
  """Sum over fields of relu(teacher loss on fakes - teacher loss on reals).

  The frozen teacher is an imperfect classifier (near chance on real slices
  for some fields), so driving its loss on generated images towards zero
  asks for prototypes it is surer about than about any real image: one
  image per condition. Hinged at the paired real batch's loss, a field
  stops pushing once the fakes are as recognisable as real slices of the
  same conditions.
  """
  missing = sorted(set(fake_losses) - set(real_losses))
  if missing:
    raise ValueError(f"teacher_hinge: no real-batch loss for {missing}")
  return sum(jax.nn.relu(fake - lax.stop_gradient(real_losses[k]))
             for k, fake in fake_losses.items())


def diversity_ratio(fake_a: jax.Array, fake_b: jax.Array, z_a: jax.Array,
                    z_b: jax.Array, cap: float) -> jax.Array:
  """Mode-seeking term (Mao et al. 2019, clipped as in Yang et al. 2019's DSGAN).

  Per example: mean |G(z_a) - G(z_b)| over pixels divided by mean |z_a - z_b|,
  clipped at `cap` so that once samples differ enough the adversarial loss
  alone decides what they look like; averaged over the batch (linear in the
  examples, so a `pmean` of per-device values is the global value).
  """
  flat = lambda x: x.reshape(x.shape[0], -1)
  image_dist = jnp.mean(jnp.abs(flat(fake_a) - flat(fake_b)), axis=-1)
  noise_dist = jnp.mean(jnp.abs(z_a - z_b), axis=-1)
  return jnp.mean(jnp.minimum(image_dist / noise_dist, cap))
