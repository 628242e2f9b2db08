"""Layers shared by the generators: N-D upsampling, modulated norms, conv blocks.

Everything works on channels-last arrays with 2 or 3 spatial dims, so the 2D
and 3D generators are the same code with a different `ndim`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import chex
import flax.linen as nn
import jax.numpy as jnp

from medgen_jax.data.info import ConditionField
from medgen_jax.models.condition import condition_embedding

Dtype = Any


def upsample_nearest(x: jnp.ndarray, factor: int = 2) -> jnp.ndarray:
  """[B, *spatial, C] -> [B, *(spatial * factor), C] by repetition."""
  for axis in range(1, x.ndim - 1):
    x = jnp.repeat(x, factor, axis=axis)
  return x


def pixel_shuffle(x: jnp.ndarray, factor: int = 2) -> jnp.ndarray:
  """Depth-to-space for any number of spatial dims.

  Args:
    x: [B, *spatial, C * factor**ndim].
    factor: upsampling factor per spatial axis.

  Returns:
    [B, *(spatial * factor), C]; output voxel (i*f + a, j*f + b, ...) takes
    input channel block (a, b, ...) of voxel (i, j, ...).
  """
  batch, *spatial, channels = x.shape
  ndim = len(spatial)
  out_c = channels // factor ** ndim
  if out_c * factor ** ndim != channels:
    raise ValueError(f"pixel_shuffle: {channels} channels not divisible by "
                     f"{factor}**{ndim}")
  x = x.reshape(batch, *spatial, *([factor] * ndim), out_c)
  # [B, s1, .., sn, f1, .., fn, C] -> [B, s1, f1, .., sn, fn, C]
  perm = [0]
  for i in range(ndim):
    perm += [1 + i, 1 + ndim + i]
  perm.append(1 + 2 * ndim)
  x = x.transpose(perm)
  return x.reshape(batch, *(s * factor for s in spatial), out_c)


def space_to_depth(x: jnp.ndarray, factor: int = 2) -> jnp.ndarray:
  """Inverse of `pixel_shuffle`: [B, *spatial, C] -> [B, *spatial/f, C*f**ndim]."""
  batch, *spatial, channels = x.shape
  ndim = len(spatial)
  if any(s % factor for s in spatial):
    raise ValueError(f"space_to_depth: spatial {tuple(spatial)} not divisible "
                     f"by {factor}")
  x = x.reshape(batch, *[d for s in spatial for d in (s // factor, factor)],
                channels)
  # [B, s1, f1, .., sn, fn, C] -> [B, s1, .., sn, f1, .., fn, C]
  perm = [0] + [1 + 2 * i for i in range(ndim)] + [2 + 2 * i for i in range(ndim)]
  x = x.transpose(perm + [1 + 2 * ndim])
  return x.reshape(batch, *(s // factor for s in spatial),
                   channels * factor ** ndim)


class ModulatedNorm(nn.Module):
  """Per-position LayerNorm whose scale and shift come from a style vector.

  AdaIN/adaLN: `norm(x) * (1 + scale(cond)) + shift(cond)`. The projection is
  zero-initialised, so at init the layer is a plain normalisation.

  Attributes:
    dtype: compute dtype.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, cond: jnp.ndarray) -> jnp.ndarray:
    """x: [B, *spatial, C]; cond: [B, D_cond] -> [B, *spatial, C]."""
    channels = x.shape[-1]
    x = nn.LayerNorm(use_scale=False, use_bias=False, dtype=self.dtype)(x)
    mod = nn.Dense(2 * channels, kernel_init=nn.initializers.zeros,
                   dtype=self.dtype, name="modulation")(cond)
    shift, scale = jnp.split(mod, 2, axis=-1)
    expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
    return x * (1 + scale[expand]) + shift[expand]


def conv(features: int, ndim: int, kernel: int = 3, *, dtype: Dtype,
         name: str | None = None, **kwargs) -> nn.Conv:
  """A 'SAME' conv with a cubic kernel over `ndim` spatial dims."""
  return nn.Conv(features, (kernel,) * ndim, padding="SAME", dtype=dtype,
                 name=name, **kwargs)


class ModulatedResBlock(nn.Module):
  """Residual block with condition-modulated norms, optionally upsampling x2.

  [1x1 conv to `features` at the input resolution, nearest x2 upsampling]
  then x + conv3(act(norm(conv3(act(norm(x)))))), norms modulated by the
  style vector. Changing width before upsampling keeps every 3x3 conv at
  `features` -> `features`, which matters on CPUs where high-resolution convs
  dominate a GAN step.

  Attributes:
    features: output channels.
    upsample: nearest x2 upsampling at the start.
    dtype: compute dtype.
  """
  features: int
  upsample: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, cond: jnp.ndarray) -> jnp.ndarray:
    """x: [B, *spatial, C_in]; cond: [B, D] -> [B, *spatial', features]."""
    ndim = x.ndim - 2
    if x.shape[-1] != self.features:
      x = nn.Dense(self.features, dtype=self.dtype, name="project")(x)
    if self.upsample:
      x = upsample_nearest(x)
    h = nn.gelu(ModulatedNorm(dtype=self.dtype)(x, cond))
    h = conv(self.features, ndim, dtype=self.dtype)(h)
    h = nn.gelu(ModulatedNorm(dtype=self.dtype)(h, cond))
    h = conv(self.features, ndim, dtype=self.dtype)(h)
    return x + h


class StyleMapping(nn.Module):
  """(z, condition embedding) -> the style vector that modulates every block.

  Feeding noise as well as the condition into the modulation is HiT-GAN's
  self-modulation; it also gives datasets without covariates a style vector.

  Attributes:
    features: style dimension.
    dtype: compute dtype.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jnp.ndarray, cond: jnp.ndarray | None) -> jnp.ndarray:
    """z: [B, latent]; cond: [B, D_cond] or None -> [B, features]."""
    h = z if cond is None else jnp.concatenate([z, cond], axis=-1)
    h = nn.gelu(nn.Dense(self.features, dtype=self.dtype)(h))
    return nn.Dense(self.features, dtype=self.dtype)(h)


class GeneratorStem(nn.Module):
  """z and conditions -> the first feature grid and the style vector.

  Attributes:
    conditions: condition fields (`DatasetInfo.conditions`).
    grid: first-stage grid per spatial axis.
    width: channels of the first grid.
    cond_dim: condition embedding and style width.
    cond_dropout: per-condition dropout to "unknown" in training.
    dtype: compute dtype.
  """
  conditions: tuple[ConditionField, ...]
  grid: tuple[int, ...]
  width: int
  cond_dim: int
  cond_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jnp.ndarray, conditions: Mapping[str, jnp.ndarray], *,
               train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Returns features [B, *grid, width] and style [B, cond_dim]."""
    chex.assert_rank(z, 2)
    missing = [f.name for f in self.conditions if f.name not in conditions]
    if missing:
      raise ValueError(f"generator: conditions {missing} missing; got "
                       f"{sorted(conditions)}")
    embed = condition_embedding(self.conditions, self.cond_dim,
                                dropout_rate=self.cond_dropout,
                                name="condition_embedding")
    cond = None
    if embed is not None:
      cond = embed({f.name: conditions[f.name] for f in self.conditions},
                   train=train).astype(self.dtype)
    z = z.astype(self.dtype)
    style = StyleMapping(self.cond_dim, dtype=self.dtype, name="mapping")(z, cond)
    h = z if cond is None else jnp.concatenate([z, cond], axis=-1)
    x = nn.Dense(math.prod(self.grid) * self.width, dtype=self.dtype,
                 name="project")(h)
    return x.reshape(z.shape[0], *self.grid, self.width), style


class OutputHead(nn.Module):
  """Features -> image in [-1, 1]: modulated norm, act, conv3, tanh.

  Attributes:
    num_channels: image channels.
    dtype: compute dtype (the image is returned in float32).
  """
  num_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, style: jnp.ndarray) -> jnp.ndarray:
    """x: [B, *spatial, C]; style: [B, D] -> [B, *spatial, num_channels]."""
    h = nn.gelu(ModulatedNorm(dtype=self.dtype)(x, style))
    h = conv(self.num_channels, x.ndim - 2, dtype=self.dtype, name="to_image")(h)
    return jnp.tanh(h.astype(jnp.float32))
