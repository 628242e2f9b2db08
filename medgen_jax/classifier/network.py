"""The condition classifier `FeatureNet` and its loss.

A ResNet-ish CNN with one head per condition field (`DatasetInfo.conditions`):
softmax logits for categorical fields, a value normalised to [0, 1] over the
field's `value_range` for continuous ones. Trained by
`medgen_jax.classifier.training`, one network per `Recipe`.

Inputs are model-range images in [-1, 1], `[B, H, W, C]` or `[B, D, H, W, C]`
(the dimensionality is taken from the input rank). GroupNorm (no batch
statistics) keeps every sample's output independent of the rest of its batch.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from medgen_jax.data.info import CATEGORICAL, ConditionField
from medgen_jax.models.condition import condition_heads
from medgen_jax.models.layers import space_to_depth


class _ResBlock(nn.Module):
  """Pre-activation residual block; `strides` > 1 downsamples every axis."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd = x.ndim - 2
    kernel, stride = (3,) * nd, (self.strides,) * nd
    y = nn.gelu(nn.GroupNorm(num_groups=min(8, x.shape[-1]))(x))
    y = nn.Conv(self.features, kernel, strides=stride)(y)
    y = nn.gelu(nn.GroupNorm(num_groups=min(8, self.features))(y))
    y = nn.Conv(self.features, kernel)(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1,) * nd, strides=stride)(x)
    return x + y


POOLINGS = ("mean", "mean_max")


class FeatureNet(nn.Module):
  """ResNet-ish condition classifier.

  Attributes:
    fields: condition fields; one head each.
    widths: channels per stage; every stage after the first halves the
      resolution.
    feature_dim: size of the penultimate (feature) layer.
    stem_patch: space-to-depth factor before the first convolution. Every
      voxel is kept (moved into channels), so a nodule of one or two voxels
      still reaches the network, while the first, costliest stage runs on
      `patch**nd` times fewer positions.
    pooling: 'mean' (global average) or 'mean_max' (average and maximum,
      concatenated). The maximum answers "is there a lesion anywhere", which
      an average over a whole chest dilutes to nothing for a small nodule.
  """
  fields: tuple[ConditionField, ...]
  widths: tuple[int, ...] = (16, 32, 64)
  feature_dim: int = 64
  stem_patch: int = 1
  pooling: str = "mean"

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """images `[B, *spatial, C]` in [-1, 1] -> (features `[B, feature_dim]`,
    {field: logits `[B, num_classes]` or normalised value `[B]`})."""
    nd = images.ndim - 2
    x = images if self.stem_patch == 1 else space_to_depth(images, self.stem_patch)
    x = nn.Conv(self.widths[0], (3,) * nd)(x)
    for i, width in enumerate(self.widths):
      x = _ResBlock(width, strides=1 if i == 0 else 2)(x)
    x = nn.gelu(nn.GroupNorm(num_groups=min(8, x.shape[-1]))(x))
    spatial_axes = tuple(range(1, 1 + nd))
    pooled = jnp.mean(x, axis=spatial_axes)
    if self.pooling == "mean_max":
      pooled = jnp.concatenate([pooled, jnp.max(x, axis=spatial_axes)], axis=-1)
    features = nn.Dense(self.feature_dim, name="features")(pooled)
    return features, condition_heads(nn.gelu(features), self.fields, prefix="head")


def condition_targets(conditions: Mapping[str, Any],
                      fields: Sequence[ConditionField]) -> dict[str, Any]:
  """What the heads are trained to output: class indices (int32, -1 unknown)
  and continuous values mapped [lo, hi] -> [0, 1] (NaN unknown). Works on
  numpy and traced jax arrays alike."""
  out = {}
  for f in fields:
    v = conditions[f.name]
    if f.kind == CATEGORICAL:
      out[f.name] = v.astype(jnp.int32)
    else:
      lo, hi = f.value_range
      out[f.name] = (v.astype(jnp.float32) - lo) / (hi - lo)
  return out


def per_example_condition_loss(kind: str, prediction: jax.Array,
                               target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(loss `[B]`, known `[B]`) of one condition head.

  Softmax cross-entropy for categorical fields (target int class, -1
  unknown), squared error for continuous ones (target float in the head's
  units, NaN unknown). Unknown rows are 0; their targets are swapped out
  before any arithmetic, so a NaN never reaches a gradient. Shared by the
  extractor/teacher (`condition_loss`) and D's AC-GAN heads
  (`train.losses.condition_prediction_loss`), which differ in how they average.
  """
  prediction = prediction.astype(jnp.float32)
  if kind == CATEGORICAL:
    known = target >= 0
    loss = optax.softmax_cross_entropy_with_integer_labels(
        prediction, jnp.where(known, target, 0).astype(jnp.int32))
  else:
    known = jnp.isfinite(target)
    loss = jnp.square(prediction - jnp.where(known, target, 0.0))
  return jnp.where(known, loss, 0.0), known


def condition_loss(model: FeatureNet, params, images, targets):
  """(sum of the heads' losses, per-field metrics) on `condition_targets`.

  Cross-entropy for categorical fields and squared error for continuous ones,
  each averaged over the known examples, summed over every head. Every
  classifier is trained on it, and the GAN's frozen condition teacher
  (`loss.teacher_weight`; its heads are exactly the fields it teaches)
  scores generated images with it.
  """
  _, heads = model.apply({"params": params}, images)
  total, metrics = 0.0, {}
  for f in model.fields:
    t, out = targets[f.name], heads[f.name]
    per_example, known = per_example_condition_loss(f.kind, out, t)
    loss = jnp.sum(per_example) / jnp.maximum(known.sum(), 1)
    if f.kind == CATEGORICAL:
      metrics[f"{f.name}_accuracy"] = (
          jnp.sum(jnp.where(known, out.argmax(-1) == t, False))
          / jnp.maximum(known.sum(), 1))
    metrics[f"{f.name}_loss"] = loss
    total = total + loss
  return total, metrics
