"""ResNet discriminator with projection conditioning (Miyato & Koyama, 2018).

logit(x, y) = w . phi(x) + sum_f <embed_f(y_f), phi(x)> + sum_g c_g <v_g, phi(x)>

phi(x) are the pooled features of a downsampling residual CNN, f runs over
categorical conditions (embed_f a learned table) and g over continuous ones
(c_g the value rescaled to [-1, 1]). An unknown condition (-1 / NaN)
contributes nothing, so the discriminator falls back to unconditional.

With `condition_heads=True` D also predicts every condition from phi(x)
(AC-GAN, Odena et al. 2017; projection plus a classifier as in P2GAN): a
softmax head per categorical field and a regression head (to the value
rescaled to [-1, 1]) per continuous one. Projection alone lets a small
lesion be ignored when the rest of the slice is convincing; the heads give
the generator a direct gradient towards drawing the requested class
(`losses.condition_prediction_loss`).

The logit and heads (`conditional_logits`), the input checks and the stem /
width plan (`resolution_plan`) are shared with the R3GAN discriminator
(`r3gan_discriminator.py`), so both name their head parameters alike.

Spectral normalisation (flax `nn.SpectralNorm`) keeps its power-iteration
vectors `u` and `sigma` in the 'batch_stats' collection. The training step
must call `D.apply({'params': p, 'batch_stats': s}, x, c, train=True,
mutable=['batch_stats'])` and keep the returned 'batch_stats'; with
`train=False` the stored estimate is used and nothing changes. Gradients do
not flow through the power iteration (flax stops them).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp

from medgen_jax.conditioning import rescale_continuous
from medgen_jax.data.info import CATEGORICAL, ConditionField
from medgen_jax.models.condition import condition_heads as make_condition_heads
from medgen_jax.models.layers import conv, space_to_depth
from medgen_jax.models.variants import parse_dtype

Dtype = Any

_MIN_SIDE = 4  # downsample until the smallest axis is this long
_MAX_MULT = 4  # widths d_width * 2**i, capped at d_width * _MAX_MULT
_STEM_MIN_SIDE = 32  # patchify (2x space-to-depth) inputs at least twice this


def _avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  ndim = x.ndim - 2
  return nn.avg_pool(x, (2,) * ndim, (2,) * ndim)


def minibatch_std(x: jnp.ndarray, group_size: int) -> jnp.ndarray:
  """Appends the minibatch standard deviation as one channel (Karras et al. 2018).

  The batch is split into contiguous groups of `group_size` examples; per
  group, the standard deviation over its examples of every feature and
  position, averaged to one number, becomes a constant extra channel of those
  examples. Samples of a mode-collapsed generator look alike, so their group
  statistic is low and D can tell them from real groups; without it D scores
  each image alone and cannot see a lack of variety.

  Contiguous (not strided) groups: when the per-device batch is a multiple of
  `group_size`, pmap / shard_map devices form exactly the groups of a
  single-device run (`medgen_jax.train.loop.validate_config` checks it).

  Args:
    x: `[B, *spatial, C]`, B a multiple of `group_size` (or smaller than it:
      then the whole batch is one group).
    group_size: examples per group (>= 2 to carry information).

  Returns:
    `[B, *spatial, C + 1]`.
  """
  b = x.shape[0]
  # A batch smaller than one group (the batch-1 dummy of `init`) is one group.
  group_size = min(group_size, b)
  if group_size < 1 or b % group_size:
    raise ValueError(f"minibatch_std: batch {b} is not a multiple of the group "
                     f"size {group_size} (model.d_minibatch_std)")
  y = x.astype(jnp.float32).reshape(b // group_size, group_size, *x.shape[1:])
  std = jnp.sqrt(jnp.var(y, axis=1) + 1e-8)              # [B / G, *spatial, C]
  per_group = jnp.mean(std, axis=tuple(range(1, std.ndim)))  # [B / G]
  per_example = jnp.repeat(per_group, group_size)         # [B]
  channel = jnp.broadcast_to(per_example.reshape(b, *([1] * (x.ndim - 1))),
                             (*x.shape[:-1], 1))
  return jnp.concatenate([x, channel.astype(x.dtype)], axis=-1)


class _Wrap(nn.Module):
  """Applies `layer`, spectrally normalised when `spectral_norm`."""
  layer: nn.Module
  spectral_norm: bool

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.spectral_norm:
      return nn.SpectralNorm(self.layer)(x, update_stats=train)
    return self.layer(x)


def resolution_plan(x: jnp.ndarray, width: int
                    ) -> tuple[jnp.ndarray, tuple[int, ...]]:
  """The input stem and the widths of a discriminator's resolutions.

  Inputs at least 2 * _STEM_MIN_SIDE on the smallest axis are patchified
  (2x space-to-depth), so the first convs run at half resolution: XLA:CPU's
  filter gradient is slowest for full-resolution, few-channel convs, and
  this is most of what keeps a 64x64 step within the CPU budget.

  Args:
    x: images [B, *spatial, C].
    width: channels at the first resolution.

  Returns:
    (x or its space-to-depth [B, *spatial / 2, C * 2**ndim], widths): one
    width per resolution, from the stem's down to the one whose smallest
    axis is _MIN_SIDE (halving every axis in between), doubling per
    downsampling up to width * _MAX_MULT.
  """
  if min(x.shape[1:-1]) >= 2 * _STEM_MIN_SIDE:
    x = space_to_depth(x)
  num_down = max(0, (min(x.shape[1:-1]) // _MIN_SIDE).bit_length() - 1)
  return x, tuple(width * min(2 ** i, _MAX_MULT) for i in range(num_down + 1))


def check_inputs(images: jnp.ndarray, conditions: Mapping[str, jnp.ndarray],
                 fields: Sequence[ConditionField], *, with_predictions: bool,
                 condition_heads: bool) -> None:
  """Raises ValueError for a call a discriminator cannot answer.

  images: [B, *spatial, C] with 2 or 3 spatial dims; conditions must hold
  every field; with_predictions needs the condition heads.
  """
  if with_predictions and not condition_heads:
    raise ValueError("discriminator: with_predictions=True needs "
                     "condition_heads=True (model.d_condition_heads)")
  chex.assert_rank(images, {4, 5})
  missing = [f.name for f in fields if f.name not in conditions]
  if missing:
    raise ValueError(f"discriminator: conditions {missing} missing; got "
                     f"{sorted(conditions)}")


def conditional_logits(features: jnp.ndarray,
                       conditions: Mapping[str, jnp.ndarray],
                       fields: Sequence[ConditionField], *, spectral_norm: bool,
                       condition_heads: bool, train: bool
                       ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray] | None]:
  """The projection-conditioned logit (module docstring) and the heads.

  Call from inside a compact discriminator method: the layers become its
  submodules, named `linear`, `embed_<field>`, `project_<field>` and
  `predict_<field>` whichever discriminator calls it.

  Args:
    features: phi(x) [B, F] float32.
    conditions: name -> [B] (int32 class, -1 unknown; float32 value, NaN
      unknown), one entry per field.
    fields: the condition fields.
    spectral_norm: normalise the linear and projection weights.
    condition_heads: build the prediction heads (created whenever set, so
      init makes them; the caller returns them on request).
    train: advance the spectral-norm power iteration.

  Returns:
    (logits [B] float32, predictions or None): predictions maps each field
    to class logits [B, K] or a value in rescaled units [B].
  """
  sn = lambda layer: _Wrap(layer, spectral_norm)
  logits = sn(nn.Dense(1, name="linear"))(features, train=train)[:, 0]
  total = jnp.zeros(features.shape[:1], jnp.float32)
  dim = features.shape[-1]
  for field in fields:
    value = jnp.asarray(conditions[field.name])
    chex.assert_shape(value, features.shape[:1])
    if field.kind == CATEGORICAL:
      known = value >= 0
      table = nn.Embed(field.num_classes, dim, name=f"embed_{field.name}")
      emb = sn(table)(jnp.where(known, value, 0).astype(jnp.int32), train=train)
      term = jnp.sum(emb * features, axis=-1)
    else:
      known, scaled = rescale_continuous(value, *field.value_range)
      direction = nn.Dense(1, use_bias=False, name=f"project_{field.name}")
      term = scaled * sn(direction)(features, train=train)[:, 0]
    total = total + jnp.where(known, term, 0.0)
  # The heads are not spectrally normalised: a normalised head's logits can
  # be no larger than the features. (Normalised heads stayed at chance
  # cross-entropy over a 1,200-step run; unnormalised ones were tried for 150
  # steps only, also at chance: commit 5f2b8c2.)
  predictions = (make_condition_heads(features, fields, prefix="predict")
                 if condition_heads else None)
  return logits + total, predictions


class DBlock(nn.Module):
  """Pre-activation residual block that halves every spatial axis.

  conv3 (in -> out) at the input resolution, average-pool, conv3 (out ->
  out) at half resolution (StyleGAN2's order rather than SNGAN's pool-last:
  half the FLOPs for the same receptive field growth).

  Attributes:
    features: output channels.
    first: the input block (no activation before the first conv, as in
      SNGAN's optimized block: the raw image is not rectified).
    downsample: average-pool x2 at the end.
    spectral_norm: wrap every conv in `nn.SpectralNorm`.
    dtype: compute dtype.
  """
  features: int
  first: bool = False
  downsample: bool = True
  spectral_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """x: [B, *spatial, C] -> [B, *spatial / 2, features]."""
    ndim = x.ndim - 2
    sn = lambda layer: _Wrap(layer, self.spectral_norm)
    h = x if self.first else nn.leaky_relu(x, 0.2)
    h = sn(conv(self.features, ndim, dtype=self.dtype))(h, train=train)
    h = nn.leaky_relu(h, 0.2)
    if self.downsample:
      h = _avg_pool(h)
      # Pool before the 1x1 conv: the same linear map at 1/2**ndim the cost.
      x = _avg_pool(x)
    h = sn(conv(self.features, ndim, dtype=self.dtype))(h, train=train)
    if x.shape[-1] != self.features:
      x = sn(conv(self.features, ndim, 1, dtype=self.dtype))(x, train=train)
    return x + h


class ResNetDiscriminator(nn.Module):
  """Downsampling residual CNN -> one logit per image, projection-conditioned.

  Attributes:
    conditions: condition fields (from `DatasetInfo.conditions`).
    width: channels of the first block; doubles per downsampling up to
      4x (the 4x4 blocks dominate FLOPs otherwise).
    spectral_norm: spectral normalisation of every weight ('batch_stats').
    minibatch_std: group size of the minibatch-std channel added before the
      last block (`minibatch_std`); 0 = off.
    condition_heads: add the condition-prediction heads (module docstring).
    dtype: compute dtype (params stay float32; the logit is float32).
  """
  conditions: tuple[ConditionField, ...] = ()
  width: int = 32
  spectral_norm: bool = True
  minibatch_std: int = 0
  condition_heads: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray, conditions: Mapping[str, jnp.ndarray],
               *, train: bool, with_predictions: bool = False):
    """Scores images.

    Args:
      images: [B, *spatial, C] in [-1, 1], 2 or 3 spatial dims.
      conditions: name -> [B]; int32 class (-1 unknown) or float32 value
        (NaN unknown), one entry per field in `self.conditions`.
      train: update the spectral-norm power iteration ('batch_stats').
      with_predictions: also return the condition predictions (needs
        `condition_heads`).

    Returns:
      logits [B] float32; with `with_predictions`, (logits, predictions) where
      predictions maps each field name to class logits [B, num_classes]
      (categorical) or a value in rescaled units [B] (continuous).
    """
    check_inputs(images, conditions, self.conditions,
                 with_predictions=with_predictions,
                 condition_heads=self.condition_heads)
    x, widths = resolution_plan(images.astype(self.dtype), self.width)
    num_down = len(widths) - 1
    for i in range(num_down):
      x = DBlock(widths[i], first=i == 0,
                 spectral_norm=self.spectral_norm, dtype=self.dtype)(x, train=train)
    if self.minibatch_std:
      x = minibatch_std(x, self.minibatch_std)
    x = DBlock(widths[-1], first=num_down == 0,
               downsample=False, spectral_norm=self.spectral_norm,
               dtype=self.dtype)(x, train=train)
    # Sum pooling as in SNGAN: with spectral norm the logit scale is set by
    # the features, not diluted by the number of positions. In 3D the
    # smallest axis stops the downsampling early (4x8x8 = 256 positions from
    # 16x32x32, against 4x4 in 2D), so logits and D gradients run ~20x
    # larger; counting the sum on a 4x4 grid instead was tried and gave a
    # worse 3D FD (103 against 78, one 600-step run each; commit 716d13e).
    features = jnp.sum(nn.leaky_relu(x, 0.2), axis=tuple(range(1, x.ndim - 1)))
    features = features.astype(jnp.float32)
    self.sow("intermediates", "features", features)
    logits, predictions = conditional_logits(
        features, conditions, self.conditions, spectral_norm=self.spectral_norm,
        condition_heads=self.condition_heads, train=train)
    return (logits, predictions) if with_predictions else logits


def build_resnet_discriminator(model_config, info) -> ResNetDiscriminator:
  """ResNetDiscriminator from `config.model` and a `DatasetInfo`."""
  return ResNetDiscriminator(
      conditions=tuple(info.conditions), width=int(model_config.d_width),
      spectral_norm=bool(model_config.spectral_norm),
      minibatch_std=int(model_config.d_minibatch_std),
      condition_heads=bool(model_config.d_condition_heads),
      dtype=parse_dtype(model_config.dtype))
