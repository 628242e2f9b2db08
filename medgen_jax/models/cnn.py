"""Convolutional generator baseline (BigGAN/ResNet-style, 2D and 3D).

The same contract as the transformer generator, with every stage a
modulated residual conv block, so "transformer vs conventional GAN" is the
one config flag `model.generator='cnn'`. It starts from the same token grid
and uses the same widths as the transformer variant, so the two differ only
in how features are mixed.
"""
from __future__ import annotations

from typing import Any, Mapping

import chex
import flax.linen as nn
import jax.numpy as jnp

from medgen_jax.data.info import ConditionField
from medgen_jax.models import shapes
from medgen_jax.models.layers import GeneratorStem, ModulatedResBlock, OutputHead
from medgen_jax.models.variants import Variant, decode_variant, parse_dtype

Dtype = Any


class CNNGenerator(nn.Module):
  """(z, conditions) -> image via x2-upsampling residual conv blocks.

  Attributes:
    spatial_shape: (H, W) or (D, H, W) of the output.
    num_channels: output channels.
    conditions: condition fields (`DatasetInfo.conditions`).
    variant: widths and `conv_depth` blocks per stage.
    token_grid: side of the first grid along the smallest axis.
    cond_dim: condition embedding / style width.
    cond_dropout: per-condition dropout to "unknown" in training.
    dtype: compute dtype (params float32, image float32).
  """
  spatial_shape: tuple[int, ...]
  num_channels: int
  conditions: tuple[ConditionField, ...]
  variant: Variant
  token_grid: int
  cond_dim: int
  cond_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jnp.ndarray, conditions: Mapping[str, jnp.ndarray], *,
               train: bool) -> jnp.ndarray:
    """Generates images.

    Args:
      z: [B, latent_dim] noise.
      conditions: name -> [B] (int32 class, -1 unknown; float32, NaN unknown).
      train: condition dropout on ('dropout' RNG stream needed).

    Returns:
      [B, *spatial_shape, num_channels] float32 in [-1, 1].
    """
    grid, num_up = shapes.upsampling_plan(self.spatial_shape, self.token_grid)
    x, style = GeneratorStem(self.conditions, grid, self.variant.stage_width(0),
                             self.cond_dim, self.cond_dropout, self.dtype,
                             name="stem")(z, conditions, train=train)
    for stage in range(num_up + 1):
      for block in range(self.variant.conv_depth):
        x = ModulatedResBlock(self.variant.stage_width(stage),
                              upsample=stage > 0 and block == 0,
                              dtype=self.dtype)(x, style)
    image = OutputHead(self.num_channels, self.dtype, name="head")(x, style)
    chex.assert_shape(image, (z.shape[0], *self.spatial_shape, self.num_channels))
    return image


def build_cnn_generator(model_config, info) -> CNNGenerator:
  """CNNGenerator from `config.model` and a `DatasetInfo` (validated here)."""
  shapes.upsampling_plan(info.spatial_shape, int(model_config.token_grid))
  return CNNGenerator(
      spatial_shape=tuple(info.spatial_shape), num_channels=info.num_channels,
      conditions=tuple(info.conditions),
      variant=decode_variant(model_config.variant),
      token_grid=int(model_config.token_grid),
      cond_dim=int(model_config.cond_dim),
      cond_dropout=float(model_config.cond_dropout),
      dtype=parse_dtype(model_config.dtype))
