"""Position information for attention: sinusoidal, learned absolute, Swin relative bias."""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def sinusoidal_position_encoding(spatial_shape: Sequence[int], dim: int) -> Array:
  """Fixed sin/cos encoding of every grid position.

  The channels are split evenly across the spatial axes; axis a owns channels
  `[a * dim / num_axes, (a + 1) * dim / num_axes)`, in which channel `2i` is
  `sin(pos * f_i)` and `2i + 1` is `cos(pos * f_i)` with
  `f_i = 10000 ** (-2i / (dim / num_axes))`. So the dot product of two
  encodings is a sum of `cos(offset * f_i)`: it depends only on the offset.

  Args:
    spatial_shape: `(L,)`, `(H, W)` or `(D, H, W)`.
    dim: channels; must be divisible by `2 * len(spatial_shape)`.

  Returns:
    float32 `[*spatial_shape, dim]` in [-1, 1].
  """
  spatial_shape = tuple(int(s) for s in spatial_shape)
  num_axes = len(spatial_shape)
  if num_axes not in (1, 2, 3) or any(s < 1 for s in spatial_shape):
    raise ValueError(f"spatial_shape must have 1-3 positive sizes; got {spatial_shape}")
  if dim < 1 or dim % (2 * num_axes):
    raise ValueError(f"dim={dim} must be divisible by 2 * num_axes = {2 * num_axes} "
                     f"for spatial_shape {spatial_shape} (sin/cos pairs per axis)")
  axis_dim = dim // num_axes
  freqs = 10000.0 ** (-np.arange(0, axis_dim, 2, dtype=np.float64) / axis_dim)
  parts = []
  for a, size in enumerate(spatial_shape):
    angles = np.arange(size, dtype=np.float64)[:, None] * freqs[None, :]
    enc = np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(size, axis_dim)
    shape = [1] * num_axes + [axis_dim]
    shape[a] = size
    parts.append(np.broadcast_to(enc.reshape(shape), spatial_shape + (axis_dim,)))
  return jnp.asarray(np.concatenate(parts, axis=-1), jnp.float32)


class LearnedPositionEmbedding(nn.Module):
  """Adds a learned absolute embedding, one vector per grid position (ViT style).

  Call `(x)` with x `[batch, *spatial, channels]`; returns x plus a parameter
  `embedding` of shape `[*spatial, channels]` (truncated normal, std `init_std`).
  """
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.ndim < 3:
      raise ValueError(f"LearnedPositionEmbedding expects [batch, *spatial, channels]; "
                       f"got shape {x.shape}")
    emb = self.param("embedding", nn.initializers.truncated_normal(self.init_std),
                     x.shape[1:], jnp.float32)
    return x + emb.astype(x.dtype)


def relative_position_index(window: Sequence[int]) -> np.ndarray:
  """Swin's table index `[T, T]` (T = prod(window)) of each token pair's offset."""
  window = tuple(window)
  coords = np.stack(np.meshgrid(*[np.arange(w) for w in window], indexing="ij"))
  coords = coords.reshape(len(window), -1)  # [axes, T]
  rel = coords[:, :, None] - coords[:, None, :]  # [axes, T, T], in (-w, w)
  index = np.zeros(rel.shape[1:], np.int64)
  for a, w in enumerate(window):
    index = index * (2 * w - 1) + rel[a] + (w - 1)
  return index


class RelativePositionBias(nn.Module):
  """Learned Swin relative position bias for one window.

  Attributes:
    num_heads: heads h.
    window_size: int (2D square window) or a 2- or 3-tuple.

  Call `()` returns float32 `[heads, T, T]` with T = prod(window): the bias that
  `window_attention` adds to every window. The table holds one value per head
  for each of the prod(2w - 1) possible offsets.
  """
  num_heads: int
  window_size: int | Sequence[int]

  @nn.compact
  def __call__(self) -> Array:
    window = ((self.window_size,) * 2 if isinstance(self.window_size, int)
              else tuple(self.window_size))
    if len(window) not in (2, 3) or any(w < 1 for w in window):
      raise ValueError(f"RelativePositionBias: window_size must be a positive int or a 2/3-"
                       f"tuple; got {self.window_size}")
    table = self.param("relative_position_bias_table",
                       nn.initializers.truncated_normal(0.02),
                       (math.prod(2 * w - 1 for w in window), self.num_heads), jnp.float32)
    index = relative_position_index(window)
    return jnp.transpose(table[index], (2, 0, 1))
