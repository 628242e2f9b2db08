"""Transformer generator (HiT-GAN / TransGAN style), 2D and 3D from one code path.

    z, conditions -> condition embedding c, style s = MLP(z, c)
    Dense(z ++ c) -> token grid [B, *grid, width] (+ position encoding)
    attention stages: TransformerBlocks (adaLN-Zero on s), pixel-shuffle x2
      upsampling between stages halving the width
    conv stages (where tokens are many): modulated residual conv blocks with
      nearest x2 upsampling
    modulated norm -> conv3 -> tanh -> [B, *spatial, C] in [-1, 1]

Every spatial operation works on `ndim` = 2 or 3 axes, so volumes use the
same modules as slices.
"""
from __future__ import annotations

from typing import Any, Mapping

import chex
import flax.linen as nn
import jax.numpy as jnp

from medgen_jax.attention import (LearnedPositionEmbedding, TransformerBlock,
                                  sinusoidal_position_encoding)
from medgen_jax.attention.registry import (block_shift, get_attention,
                                           sequence_parallel_form)
from medgen_jax.attention.sequence_parallel import SequenceSharding
from medgen_jax.data.info import ConditionField
from medgen_jax.models import shapes
from medgen_jax.models.layers import (GeneratorStem, ModulatedResBlock,
                                      OutputHead, pixel_shuffle)
from medgen_jax.models.variants import Variant, decode_variant, parse_dtype

Dtype = Any

POSITION_ENCODINGS = ("learned", "sinusoidal")


def check_config(spatial_shape: tuple[int, ...], variant: Variant, *,
                 token_grid: int, attention: str, window_size: int,
                 attention_stages: int, position_encoding: str) -> None:
  """Raises one clear ValueError if the sizes cannot build a generator."""
  get_attention(attention)
  if position_encoding not in POSITION_ENCODINGS:
    raise ValueError(f"unknown position_encoding {position_encoding!r}; "
                     f"valid: {list(POSITION_ENCODINGS)}")
  grid, num_up = shapes.upsampling_plan(spatial_shape, token_grid)
  max_stages = min(num_up + 1, len(variant.depth))
  if not 1 <= attention_stages <= max_stages:
    raise ValueError(
        f"attention_stages={attention_stages} must be in [1, {max_stages}]: "
        f"image {tuple(spatial_shape)} from token_grid={token_grid} has "
        f"{num_up + 1} stages and the variant defines {len(variant.depth)}")
  grids = shapes.stage_grids(grid, num_up)[:attention_stages]
  shapes.check_windows(grids, attention, window_size)
  for stage in range(attention_stages):
    width, heads = variant.stage_width(stage), variant.num_heads[stage]
    if width % heads:
      raise ValueError(f"variant: stage {stage} width {width} is not "
                       f"divisible by num_heads {heads}")
    if position_encoding == "sinusoidal" and width % (2 * len(grid)):
      raise ValueError(f"sinusoidal position encoding needs stage {stage} "
                       f"width {width} divisible by 2 * {len(grid)}")


class TransformerGenerator(nn.Module):
  """(z, conditions) -> image; attention where tokens are few, convs after.

  Attributes:
    spatial_shape: (H, W) or (D, H, W) of the output.
    num_channels: output channels.
    conditions: condition fields (`DatasetInfo.conditions`).
    variant: widths, depths and heads.
    token_grid: side of the first token grid along the smallest axis.
    attention: 'full' | 'axial' | 'window' | 'window_shifted'.
    window_size: window side for the window variants.
    attention_stages: number of stages (from the token grid) with attention.
    mlp_ratio: transformer MLP expansion.
    cond_dim: condition embedding / style width.
    cond_dropout: per-condition dropout to "unknown" in training.
    qk_norm: RMS-normalise queries and keys.
    chunk_size: memory-efficient full attention block size (None = off).
    position_encoding: 'learned' | 'sinusoidal', added at every attention
      stage.
    dtype: compute dtype (params float32, image float32).
    sequence_sharding: None (default) = device-agnostic. Set by the trainer
      when the mesh has seq > 1 (`medgen_jax.train.parallel`): attention-stage
      activations `[batch, *grid, width]` are constrained to the logical
      layout ('batch', 'depth', 'height', 'width', 'embed') and attention runs
      sequence-parallel. Adds no parameters.
  """
  spatial_shape: tuple[int, ...]
  num_channels: int
  conditions: tuple[ConditionField, ...]
  variant: Variant
  token_grid: int = 8
  attention: str = "window_shifted"
  window_size: int = 4
  attention_stages: int = 2
  mlp_ratio: float = 4
  cond_dim: int = 128
  cond_dropout: float = 0.0
  qk_norm: bool = True
  chunk_size: int | None = None
  position_encoding: str = "learned"
  dtype: Dtype = jnp.float32
  sequence_sharding: SequenceSharding | None = None

  @nn.compact
  def __call__(self, z: jnp.ndarray, conditions: Mapping[str, jnp.ndarray], *,
               train: bool) -> jnp.ndarray:
    """Generates images.

    Args:
      z: [B, latent_dim] noise.
      conditions: name -> [B] (int32 class, -1 unknown; float32, NaN unknown).
      train: dropout on (needs the 'dropout' RNG stream).

    Returns:
      [B, *spatial_shape, num_channels] float32 in [-1, 1].
    """
    check_config(self.spatial_shape, self.variant, token_grid=self.token_grid,
                 attention=self.attention, window_size=self.window_size,
                 attention_stages=self.attention_stages,
                 position_encoding=self.position_encoding)
    grid, num_up = shapes.upsampling_plan(self.spatial_shape, self.token_grid)
    grids = shapes.stage_grids(grid, num_up)
    width = self.variant.stage_width
    x, style = GeneratorStem(self.conditions, grid, width(0), self.cond_dim,
                             self.cond_dropout, self.dtype,
                             name="stem")(z, conditions, train=train)
    for stage in range(num_up + 1):
      if stage < self.attention_stages:
        if stage > 0:
          # Sub-pixel upsampling: a 1x1 projection to 2**ndim * width, then
          # depth-to-space; attention mixes the new tokens right after.
          x = nn.Dense(2 ** len(grid) * width(stage), dtype=self.dtype,
                       name=f"upsample_{stage}")(x)
          x = pixel_shuffle(x)
        x = x + self._position(grids[stage], width(stage), stage)
        x = self._attention_stage(x, style, stage, train=train)
      else:
        for block in range(self.variant.conv_depth):
          x = ModulatedResBlock(width(stage), upsample=block == 0,
                                dtype=self.dtype,
                                name=f"conv_{stage}_{block}")(x, style)
    image = OutputHead(self.num_channels, self.dtype, name="head")(x, style)
    chex.assert_shape(image, (z.shape[0], *self.spatial_shape, self.num_channels))
    return image

  def _position(self, grid: tuple[int, ...], dim: int, stage: int) -> jnp.ndarray:
    """Position encoding [1, *grid, dim] for one stage."""
    if self.position_encoding == "sinusoidal":
      return sinusoidal_position_encoding(grid, dim)[None].astype(self.dtype)
    zeros = jnp.zeros((1, *grid, dim), self.dtype)
    return LearnedPositionEmbedding(name=f"position_{stage}")(zeros)

  def _attention_stage(self, x: jnp.ndarray, style: jnp.ndarray, stage: int, *,
                       train: bool) -> jnp.ndarray:
    grid = x.shape[1:-1]
    layout = self.sequence_sharding
    constrain = (lambda t: t) if layout is None else layout.constrain
    attention_fn = (None if layout is None
                    else layout.attention_fn(sequence_parallel_form(self.attention)))
    # Pinning every block's input and output keeps the partitioner from
    # gathering the grid between the shard_mapped attention calls.
    x = constrain(x)
    for block in range(self.variant.depth[stage]):
      shift = block_shift(self.attention, self.window_size, grid, block)
      x = TransformerBlock(
          num_heads=self.variant.num_heads[stage], mlp_ratio=self.mlp_ratio,
          attention=self.attention, window_size=self.window_size, shift=shift,
          qk_norm=self.qk_norm, chunk_size=self.chunk_size, dtype=self.dtype,
          attention_fn=attention_fn,
          name=f"block_{stage}_{block}")(x, style, deterministic=not train)
      x = constrain(x)
    return x


def build_transformer_generator(model_config, info) -> TransformerGenerator:
  """TransformerGenerator from `config.model` and a `DatasetInfo`.

  Sizes are validated here, before any tracing.
  """
  variant = decode_variant(model_config.variant)
  kwargs = dict(
      token_grid=int(model_config.token_grid),
      attention=str(model_config.attention),
      window_size=int(model_config.window_size),
      attention_stages=int(model_config.attention_stages),
      position_encoding=str(model_config.position_encoding))
  check_config(tuple(info.spatial_shape), variant, **kwargs)
  return TransformerGenerator(
      spatial_shape=tuple(info.spatial_shape), num_channels=info.num_channels,
      conditions=tuple(info.conditions), variant=variant,
      mlp_ratio=float(model_config.mlp_ratio),
      cond_dim=int(model_config.cond_dim),
      cond_dropout=float(model_config.cond_dropout),
      qk_norm=bool(model_config.qk_norm),
      chunk_size=model_config.chunk_size,
      dtype=parse_dtype(model_config.dtype), **kwargs)
