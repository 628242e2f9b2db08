"""Hourglass transformer backbone (HDiT / U-ViT style), 2D and 3D from one code path.

    x [B, *spatial, C_in], style s [B, D]
      -> PatchEmbed: space-to-depth by `patch`, Dense -> tokens [B, *grid_0, widths[0]]
         (+ learned position embedding)
      -> down path, level i < L-1: Level (TransformerBlocks, adaLN-Zero on s,
         `attention` with `window_size`), keep the skip, TokenMerge
         (pixel-unshuffle x2, Dense) -> [B, *grid_i / 2, widths[i+1]]
      -> coarsest level L-1: position embedding, Level with full attention
      -> up path, level i = L-2 .. 0: TokenSplit (Dense, pixel-shuffle x2),
         SkipMerge with the down path's skip ('linear': Dense on the concat;
         'lerp': HDiT's per-channel interpolation), Level
      -> Head: modulated norm, zero-initialised Dense, depth-to-space by `patch`
      -> [B, *spatial, out_channels]

Each level keeps its width and grid; levels are joined by the token merge
(every 2**ndim neighbours become one token) and the token split (its
inverse), so fine levels hold many tokens and use windowed or axial
attention, the coarsest few tokens attend fully. The style vector (time and
condition embedding, built by the caller) modulates every block, so the
backbone serves any network that has one: `models.velocity.FlowGenerator`
with `model.backbone = 'hourglass'`.

Sizes are data (`HourglassSpec`): widths and depths per level, patch side,
head width, skip merge. Level i (fine) has `depths[i]` blocks on the way down
and as many on the way up; the coarsest has `depths[-1]`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp

from medgen_jax.attention import (ATTENTION_VARIANTS, LearnedPositionEmbedding,
                                  TransformerBlock)
from medgen_jax.models import shapes
from medgen_jax.models.layers import ModulatedNorm, pixel_shuffle, space_to_depth

Dtype = Any

SKIP_MERGES = ("linear", "lerp")


@dataclasses.dataclass(frozen=True)
class HourglassSpec:
  """Sizes of one hourglass.

  Attributes:
    widths: channels per level, finest first.
    depths: blocks per level: fine levels have this many on each side of the
      hourglass, the coarsest (last) level this many in total.
    patch: side of the patch that one finest-level token covers.
    head_dim: channels per attention head (heads = width / head_dim).
    attention: variant at the fine levels ('window_shifted', 'window', 'axial',
      'full'); the coarsest level always uses 'full'.
    window_size: window side for the windowed variants.
    skip: 'linear' (Dense on [up, skip]) or 'lerp' (skip + f * (up - skip),
      learned per-channel f starting at 0.5).
    mlp_ratio: MLP hidden width / channels.
    qk_norm: LayerNorm queries and keys.
  """
  widths: tuple[int, ...]
  depths: tuple[int, ...]
  patch: int = 4
  head_dim: int = 32
  attention: str = "window_shifted"
  window_size: int = 4
  skip: str = "linear"
  mlp_ratio: float = 4.0
  qk_norm: bool = True

  @property
  def num_levels(self) -> int:
    return len(self.widths)

  def level_attention(self, level: int) -> str:
    """The attention variant of `level` (0 = finest)."""
    return "full" if level == self.num_levels - 1 else self.attention


def level_grids(spatial_shape: Sequence[int], spec: HourglassSpec
                ) -> tuple[tuple[int, ...], ...]:
  """Token grid per level, finest first: spatial / patch, halved per level."""
  return tuple(tuple(int(s) // (spec.patch * 2 ** i) for s in spatial_shape)
               for i in range(spec.num_levels))


def check_spec(spatial_shape: Sequence[int], spec: HourglassSpec) -> None:
  """One clear ValueError if `spec` cannot build an hourglass for `spatial_shape`."""
  spatial_shape = tuple(int(s) for s in spatial_shape)
  if len(spatial_shape) not in (2, 3):
    raise ValueError(f"hourglass: 2 or 3 spatial dims, got {spatial_shape}")
  if not spec.widths or len(spec.widths) != len(spec.depths):
    raise ValueError(f"hourglass: widths {spec.widths} and depths {spec.depths} need one "
                     f"entry per level (at least one)")
  if any(d < 0 for d in spec.depths) or spec.patch < 1:
    raise ValueError(f"hourglass: depths {spec.depths} must be >= 0 and patch "
                     f"{spec.patch} >= 1")
  if spec.attention not in ATTENTION_VARIANTS:
    raise ValueError(f"hourglass: unknown attention {spec.attention!r}; valid: "
                     f"{list(ATTENTION_VARIANTS)}")
  if spec.skip not in SKIP_MERGES:
    raise ValueError(f"hourglass: skip {spec.skip!r} must be one of {SKIP_MERGES}")
  factor = spec.patch * 2 ** (spec.num_levels - 1)
  if any(s % factor for s in spatial_shape):
    raise ValueError(f"hourglass: image {spatial_shape} must be divisible by patch "
                     f"{spec.patch} * 2**{spec.num_levels - 1} = {factor} on every axis")
  for level, width in enumerate(spec.widths):
    if width % spec.head_dim:
      raise ValueError(f"hourglass: level {level} width {width} is not a multiple of "
                       f"head_dim {spec.head_dim}")
  grids = level_grids(spatial_shape, spec)
  fine = [g for level, g in enumerate(grids) if spec.depths[level]
          and spec.level_attention(level) != "full"]
  shapes.check_windows(fine, spec.attention, spec.window_size)


class PatchEmbed(nn.Module):
  """[B, *spatial, C] -> [B, *spatial / patch, width] tokens with positions."""
  width: int
  patch: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = space_to_depth(x.astype(self.dtype), self.patch) if self.patch > 1 else x
    h = nn.Dense(self.width, dtype=self.dtype, name="project")(h.astype(self.dtype))
    return LearnedPositionEmbedding(name="position")(h)


class TokenMerge(nn.Module):
  """Pixel-unshuffle x2 then Dense: [B, *grid, C] -> [B, *grid / 2, width]."""
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return nn.Dense(self.width, use_bias=False, dtype=self.dtype,
                    name="project")(space_to_depth(x, 2))


class TokenSplit(nn.Module):
  """Dense then pixel-shuffle x2: [B, *grid, C] -> [B, *grid * 2, width]."""
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    ndim = x.ndim - 2
    h = nn.Dense(self.width * 2 ** ndim, use_bias=False, dtype=self.dtype,
                 name="project")(x)
    return pixel_shuffle(h, 2)


class SkipMerge(nn.Module):
  """Joins the up path x and the skip (both [B, *grid, C]) -> [B, *grid, C].

  'linear': Dense(concat[x, skip]); 'lerp': skip + f * (x - skip) with a
  learned per-channel f, 0.5 at init (HDiT).
  """
  mode: str = "linear"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, skip: jnp.ndarray) -> jnp.ndarray:
    chex.assert_equal_shape((x, skip))
    if self.mode == "lerp":
      f = self.param("factor", nn.initializers.constant(0.5), (x.shape[-1],))
      return skip + f.astype(self.dtype) * (x - skip)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="project")(
        jnp.concatenate([x, skip], axis=-1))


class Level(nn.Module):
  """`depth` adaLN-Zero TransformerBlocks at one grid: [B, *grid, C] -> same.

  'window_shifted' alternates unshifted and half-window-shifted blocks (Swin),
  as the generator's attention stages do.
  """
  depth: int
  num_heads: int
  attention: str
  window_size: int
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, style: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    grid = x.shape[1:-1]
    can_shift = self.attention == "window_shifted" and self.window_size < min(grid)
    for block in range(self.depth):
      shift = self.window_size // 2 if can_shift and block % 2 else 0
      x = TransformerBlock(
          num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, attention=self.attention,
          window_size=self.window_size, shift=shift, qk_norm=self.qk_norm,
          dtype=self.dtype, name=f"block_{block}")(x, style, deterministic=not train)
    return x


class Head(nn.Module):
  """Modulated norm, zero-initialised Dense, depth-to-space by `patch`.

  [B, *grid, C], style [B, D] -> [B, *grid * patch, out_channels]; a fresh
  head outputs zeros (DiT).
  """
  out_channels: int
  patch: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, style: jnp.ndarray) -> jnp.ndarray:
    ndim = x.ndim - 2
    h = ModulatedNorm(dtype=self.dtype, name="norm")(x, style)
    h = nn.Dense(self.patch ** ndim * self.out_channels, dtype=self.dtype,
                 kernel_init=nn.initializers.zeros, name="project")(h)
    return pixel_shuffle(h, self.patch) if self.patch > 1 else h


class Hourglass(nn.Module):
  """Hourglass of token levels: (x, style) -> [B, *spatial, out_channels].

  Attributes:
    spec: the sizes (`HourglassSpec`).
    out_channels: output channels.
    dtype: compute dtype (the output is float32).

  Parameter names: patch_embed, down_{i} / merge_{i} (fine levels i on the
  way down), middle_position and middle (coarsest level), split_{i} /
  skip_{i} / up_{i} (on the way up), head.
  """
  spec: HourglassSpec
  out_channels: int
  dtype: Dtype = jnp.float32

  def level(self, level: int, depth: int, name: str) -> Level:
    spec = self.spec
    return Level(depth, spec.widths[level] // spec.head_dim, spec.level_attention(level),
                 spec.window_size, spec.mlp_ratio, spec.qk_norm, self.dtype, name=name)

  @nn.compact
  def __call__(self, x: jnp.ndarray, style: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """x `[B, *spatial, C_in]`, style `[B, D]` -> `[B, *spatial, out_channels]` float32."""
    spec = self.spec
    check_spec(x.shape[1:-1], spec)
    chex.assert_rank(style, 2)
    last = spec.num_levels - 1
    h = PatchEmbed(spec.widths[0], spec.patch, self.dtype, name="patch_embed")(x)
    skips = []
    for i in range(last):
      h = self.level(i, spec.depths[i], f"down_{i}")(h, style, train=train)
      skips.append(h)
      h = TokenMerge(spec.widths[i + 1], self.dtype, name=f"merge_{i}")(h)
    if last > 0:
      h = LearnedPositionEmbedding(name="middle_position")(h)
    h = self.level(last, spec.depths[last], "middle")(h, style, train=train)
    for i in reversed(range(last)):
      h = TokenSplit(spec.widths[i], self.dtype, name=f"split_{i}")(h)
      h = SkipMerge(spec.skip, self.dtype, name=f"skip_{i}")(h, skips[i])
      h = self.level(i, spec.depths[i], f"up_{i}")(h, style, train=train)
    out = Head(self.out_channels, spec.patch, self.dtype, name="head")(h, style)
    chex.assert_shape(out, (*x.shape[:-1], self.out_channels))
    return out.astype(jnp.float32)


def spec_from_config(section, *, attention: str, window_size: int, mlp_ratio: float,
                     qk_norm: bool) -> HourglassSpec:
  """`HourglassSpec` from `config.model.hourglass` and the model's shared keys."""
  return HourglassSpec(
      widths=tuple(int(w) for w in section.widths),
      depths=tuple(int(d) for d in section.depths), patch=int(section.patch),
      head_dim=int(section.head_dim), attention=str(attention),
      window_size=int(window_size), skip=str(section.skip), mlp_ratio=float(mlp_ratio),
      qk_norm=bool(qk_norm))
