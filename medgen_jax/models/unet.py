"""pix2pix-style U-Net translation baseline (Isola et al. 2017), 2D and 3D.

    sources (channels stacked, missing ones zero-filled: a CNN has no token
    set to mask, which is the baseline's known weakness) ->
    encoder: conv4 stride 2 + LeakyReLU, widths doubling (capped)
    bottleneck: + condition embedding (broadcast add)
    decoder: nearest x2 + conv3, skip concatenation, ReLU
    conv3 -> tanh

Same call signature as `Translator`, so the translation step, evaluation and
configs switch between them with `model.generator`.
"""
from __future__ import annotations

from typing import Any, Mapping

import chex
import flax.linen as nn
import jax.numpy as jnp

from medgen_jax.data.info import ConditionField
from medgen_jax.models.condition import condition_embedding
from medgen_jax.models.layers import conv, upsample_nearest
from medgen_jax.models.translator import source_target_names
from medgen_jax.models.variants import parse_dtype

Dtype = Any


class UNet(nn.Module):
  """(sources, conditions) -> target image.

  Attributes:
    spatial_shape: (H, W) or (D, H, W); every axis divisible by 2**levels.
    source_modalities: source names, stacked as input channels in this order.
    num_target_channels: output channels.
    conditions: covariate fields.
    width: channels of the first level.
    levels: number of stride-2 downsamplings.
    max_width_mult: width cap as a multiple of `width`.
    cond_dim: condition embedding width.
    cond_dropout: per-condition dropout in training.
    dtype: compute dtype.
  """
  spatial_shape: tuple[int, ...]
  source_modalities: tuple[str, ...]
  num_target_channels: int
  conditions: tuple[ConditionField, ...] = ()
  width: int = 32
  levels: int = 4
  max_width_mult: int = 8
  cond_dim: int = 128
  cond_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sources: Mapping[str, jnp.ndarray],
               conditions: Mapping[str, jnp.ndarray], *, train: bool,
               source_mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """sources: name -> [B, *spatial, 1] (absent -> zeros); source_mask bool
    [B, num_sources] zeroes masked sources. Returns [B, *spatial, T] in [-1, 1]."""
    unknown = sorted(set(sources) - set(self.source_modalities))
    if unknown or not sources:
      raise ValueError(f"unet: sources {sorted(sources)} must be a non-empty "
                       f"subset of {self.source_modalities}")
    ref = next(iter(sources.values()))
    batch, ndim = ref.shape[0], len(self.spatial_shape)
    channels = []
    for i, n in enumerate(self.source_modalities):
      x = sources.get(n, jnp.zeros_like(ref))
      chex.assert_shape(x, (batch, *self.spatial_shape, 1))
      if source_mask is not None:
        keep = source_mask[:, i].astype(x.dtype)
        x = x * keep.reshape((batch,) + (1,) * (ndim + 1))
      channels.append(x)
    x = jnp.concatenate(channels, -1).astype(self.dtype)

    width = lambda level: self.width * min(2 ** level, self.max_width_mult)
    skips = []
    for level in range(self.levels):
      x = conv(width(level), ndim, 4, strides=(2,) * ndim, dtype=self.dtype,
               name=f"down_{level}")(x)
      x = nn.leaky_relu(x, 0.2)
      skips.append(x)
    embed = condition_embedding(self.conditions, self.cond_dim,
                                dropout_rate=self.cond_dropout,
                                name="condition_embedding")
    if embed is not None:
      c = embed({f.name: conditions[f.name] for f in self.conditions}, train=train)
      c = nn.Dense(x.shape[-1], dtype=self.dtype, name="cond_project")(c)
      x = x + c.reshape((batch,) + (1,) * ndim + (x.shape[-1],))
    for level in reversed(range(self.levels)):
      if level < self.levels - 1:
        x = jnp.concatenate([x, skips[level]], -1)
      x = upsample_nearest(x)
      out = width(level - 1) if level > 0 else self.width
      x = nn.relu(conv(out, ndim, dtype=self.dtype, name=f"up_{level}")(x))
    x = conv(self.num_target_channels, ndim, dtype=self.dtype, name="to_image")(x)
    return jnp.tanh(x.astype(jnp.float32))


def build_unet(model_config, info) -> UNet:
  """UNet from config.model (modality names, d_width-like `unet_width`,
  `unet_levels`) and a DatasetInfo."""
  src, tgt = source_target_names(model_config, info)
  levels = int(model_config.unet_levels)
  if any(s % 2 ** levels for s in info.spatial_shape):
    raise ValueError(f"model.unet_levels={levels}: image size "
                     f"{tuple(info.spatial_shape)} not divisible by {2 ** levels}")
  return UNet(spatial_shape=tuple(info.spatial_shape), source_modalities=src,
              num_target_channels=len(tgt), conditions=tuple(info.conditions),
              width=int(model_config.unet_width), levels=levels,
              cond_dim=int(model_config.cond_dim),
              cond_dropout=float(model_config.cond_dropout),
              dtype=parse_dtype(model_config.dtype))
