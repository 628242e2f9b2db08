"""Cross-modal transformer translator: source modalities -> target modality.

    each source s: patch conv -> tokens [B, *grid, width] + position
      + learned modality embedding e_s -> encoder blocks (within s only)
    target stream: masked mean of the present sources' tokens + target
      position embedding
    blocks: x += gate * CrossModalAttention(adaLN(x), all source tokens,
      context_mask) ; x = TransformerBlock(x, style)   (self-attention + MLP)
    head: adaLN -> Dense -> depth-to-space (patch) -> conv refine -> tanh

A source is either absent from the `sources` dict (its tokens are not built)
or present and masked per example (`source_mask`, or modality dropout in
training). Both give the same output: a masked source's tokens get zero
softmax weight in every cross-attention and zero weight in the masked mean,
and encoders never mix modalities, so nothing else sees them. A missing
source is never zero-filled (a zero image is a valid, wrong input).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax.attention import (CrossModalAttention, LearnedPositionEmbedding,
                                  TransformerBlock)
from medgen_jax.attention.registry import block_shift, check_window, get_attention
from medgen_jax.data.info import ConditionField
from medgen_jax.models.condition import condition_embedding
from medgen_jax.models.layers import ModulatedNorm, conv, pixel_shuffle
from medgen_jax.models.variants import decode_variant, parse_dtype

Dtype = Any


def split_modalities(images: jnp.ndarray, modalities: Sequence[str],
                     names: Sequence[str]) -> dict[str, jnp.ndarray]:
  """Channels of `images` [B, *spatial, C] as {name: [B, *spatial, 1]}."""
  missing = [n for n in names if n not in modalities]
  if missing:
    raise ValueError(f"modalities {missing} not in the data's channels "
                     f"{tuple(modalities)}")
  return {n: images[..., modalities.index(n)][..., None] for n in names}


def modality_dropout_mask(rng: jax.Array, batch: int, num_sources: int,
                          rate: float) -> jnp.ndarray:
  """Bool [batch, num_sources]: each source kept with prob 1 - rate.

  An example whose draw drops every source keeps all of them, so every
  example has at least one source to translate from.
  """
  keep = jax.random.bernoulli(rng, 1.0 - rate, (batch, num_sources))
  return keep | ~jnp.any(keep, axis=1, keepdims=True)


class _CrossBlock(nn.Module):
  """x + gate(c) * CrossModalAttention(modulate(LN(x), c), context)."""
  num_heads: int
  qk_norm: bool
  chunk_size: int | None
  dtype: Dtype

  @nn.compact
  def __call__(self, x, context, context_mask, style, *, deterministic: bool):
    channels = x.shape[-1]
    h = nn.LayerNorm(use_scale=style is None, use_bias=style is None,
                     dtype=self.dtype, name="norm")(x)
    gate = 1.0
    if style is not None:
      mod = nn.Dense(3 * channels, kernel_init=nn.initializers.zeros,
                     dtype=self.dtype, name="modulation")(style)
      shift, scale, gate = jnp.split(mod, 3, axis=-1)
      expand = lambda t: t.reshape((t.shape[0],) + (1,) * (x.ndim - 2) + (channels,))
      h = h * (1 + expand(scale)) + expand(shift)
      # The gate starts at 1 (not adaLN-Zero's 0): translation needs the
      # sources from the first step on.
      gate = 1.0 + expand(gate)
    out = CrossModalAttention(self.num_heads, qk_norm=self.qk_norm,
                              chunk_size=self.chunk_size, dtype=self.dtype,
                              name="cross_attention")(
        h, context, context_mask=context_mask, deterministic=deterministic)
    return x + gate * out


class Translator(nn.Module):
  """(sources, conditions) -> target image, sources fused by cross-attention.

  Attributes:
    spatial_shape: (H, W) or (D, H, W).
    source_modalities: names of the possible sources, in a fixed order.
    num_target_channels: output channels (target modalities).
    conditions: covariate fields (`DatasetInfo.conditions`).
    width, depth, num_heads: token width, translator blocks, heads.
    encoder_depth: self-attention blocks per source encoder.
    patch_size: side of a token's patch.
    attention: self-attention variant of the target stream and encoders.
    window_size: window side for windowed attention.
    mlp_ratio, qk_norm, chunk_size: see `TransformerBlock`.
    cond_dim: condition embedding / style width.
    cond_dropout: per-condition dropout to "unknown" in training.
    modality_dropout: per-example, per-source drop probability in training.
    refine_width: channels of the full-resolution conv refinement.
    dtype: compute dtype (output float32).
  """
  spatial_shape: tuple[int, ...]
  source_modalities: tuple[str, ...]
  num_target_channels: int
  conditions: tuple[ConditionField, ...] = ()
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  encoder_depth: int = 1
  patch_size: int = 4
  attention: str = "window_shifted"
  window_size: int = 4
  mlp_ratio: float = 4
  qk_norm: bool = True
  chunk_size: int | None = None
  cond_dim: int = 128
  cond_dropout: float = 0.0
  modality_dropout: float = 0.0
  refine_width: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sources: Mapping[str, jnp.ndarray],
               conditions: Mapping[str, jnp.ndarray], *, train: bool,
               source_mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Translates.

    Args:
      sources: name -> [B, *spatial_shape, 1] in [-1, 1]; any non-empty
        subset of `source_modalities` (absent = missing for every example).
      conditions: name -> [B] covariates (-1 / NaN unknown).
      train: condition and modality dropout on (needs the 'dropout' stream).
      source_mask: bool [B, len(source_modalities)], True where a source is
        present (columns of absent sources are ignored); None = all present.

    Returns:
      [B, *spatial_shape, num_target_channels] float32 in [-1, 1].
    """
    names = [n for n in self.source_modalities if n in sources]
    unknown = sorted(set(sources) - set(self.source_modalities))
    if unknown or not names:
      raise ValueError(f"translator: sources {sorted(sources)} must be a "
                       f"non-empty subset of {self.source_modalities}")
    first = sources[names[0]]
    batch = first.shape[0]
    for n in names:
      chex.assert_shape(sources[n], (batch, *self.spatial_shape, 1))
    num_src = len(self.source_modalities)
    if source_mask is None:
      source_mask = jnp.ones((batch, num_src), bool)
    chex.assert_shape(source_mask, (batch, num_src))
    source_mask = source_mask.astype(bool)
    if train and self.modality_dropout > 0:
      source_mask = source_mask & modality_dropout_mask(
          self.make_rng("dropout"), batch, num_src, self.modality_dropout)
    style = self._style(conditions, batch, train=train)

    tokens, masks = [], []
    for n in names:
      t = self._encode(sources[n], n, style, train=train)   # [B, *grid, W]
      tokens.append(t)
      masks.append(source_mask[:, self.source_modalities.index(n)])
    grid = tokens[0].shape[1:-1]
    n_tok = math.prod(grid)
    weights = jnp.stack(masks, 1).astype(self.dtype)        # [B, S_present]
    expand = (slice(None),) + (None,) * len(grid) + (None,)
    # Masked mean of the present sources: aligned modalities give a
    # spatially faithful start for the target stream.
    x = sum(t * weights[:, i][expand] for i, t in enumerate(tokens))
    x = x / jnp.maximum(weights.sum(1), 1.0)[expand]
    x = LearnedPositionEmbedding(name="target_position")(x)
    context = jnp.concatenate([t.reshape(batch, n_tok, -1) for t in tokens], 1)
    context_mask = jnp.repeat(jnp.stack(masks, 1), n_tok, axis=1)

    for i in range(self.depth):
      x = _CrossBlock(self.num_heads, self.qk_norm, self.chunk_size, self.dtype,
                      name=f"cross_{i}")(x, context, context_mask, style,
                                         deterministic=not train)
      x = self._block(x, style, i, f"block_{i}", train=train)
    return self._head(x, style)

  def _style(self, conditions, batch: int, *, train: bool):
    embed = condition_embedding(self.conditions, self.cond_dim,
                                dropout_rate=self.cond_dropout,
                                name="condition_embedding")
    if embed is None:
      return None
    missing = [f.name for f in self.conditions if f.name not in conditions]
    if missing:
      raise ValueError(f"translator: conditions {missing} missing; got "
                       f"{sorted(conditions)}")
    c = embed({f.name: conditions[f.name] for f in self.conditions}, train=train)
    chex.assert_shape(c, (batch, self.cond_dim))
    return nn.Dense(self.cond_dim, dtype=self.dtype, name="style")(
        nn.gelu(c.astype(self.dtype)))

  def _block(self, x, style, index: int, name: str, *, train: bool):
    shift = block_shift(self.attention, self.window_size, x.shape[1:-1], index)
    return TransformerBlock(
        num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
        attention=self.attention, window_size=self.window_size, shift=shift,
        qk_norm=self.qk_norm, chunk_size=self.chunk_size, dtype=self.dtype,
        name=name)(x, style, deterministic=not train)

  def _encode(self, image, name: str, style, *, train: bool):
    """One source [B, *spatial, 1] -> tokens [B, *grid, width]."""
    ndim = len(self.spatial_shape)
    p = self.patch_size
    t = nn.Conv(self.width, (p,) * ndim, strides=(p,) * ndim, padding="VALID",
                dtype=self.dtype, name=f"patch_{name}")(image.astype(self.dtype))
    t = LearnedPositionEmbedding(name=f"position_{name}")(t)
    modality = self.param(f"modality_{name}", nn.initializers.normal(0.02),
                          (self.width,), jnp.float32)
    t = t + modality.astype(self.dtype)
    for i in range(self.encoder_depth):
      t = self._block(t, style, i, f"encoder_{name}_{i}", train=train)
    return t

  def _head(self, x, style):
    ndim = len(self.spatial_shape)
    p = self.patch_size
    h = (ModulatedNorm(dtype=self.dtype, name="head_norm")(x, style)
         if style is not None else nn.LayerNorm(dtype=self.dtype, name="head_norm")(x))
    h = nn.Dense(p ** ndim * self.refine_width, dtype=self.dtype,
                 name="head_project")(h)
    h = pixel_shuffle(h, p)                                 # [B, *spatial, R]
    # Smooths patch seams at full resolution.
    h = h + conv(self.refine_width, ndim, dtype=self.dtype, name="refine")(nn.gelu(h))
    h = conv(self.num_target_channels, ndim, dtype=self.dtype,
             name="to_image")(nn.gelu(h))
    return jnp.tanh(h.astype(jnp.float32))


def check_translator_config(spatial_shape: Sequence[int], *, patch_size: int,
                            attention: str, window_size: int, width: int,
                            num_heads: int) -> None:
  """One clear ValueError if the sizes cannot build a translator."""
  get_attention(attention)
  if patch_size < 1 or any(s % patch_size for s in spatial_shape):
    raise ValueError(f"model.patch_size={patch_size} must divide the image "
                     f"size {tuple(spatial_shape)}")
  grid = [s // patch_size for s in spatial_shape]
  check_window(attention, window_size, grid)
  if width % num_heads:
    raise ValueError(f"translator width {width} not divisible by num_heads "
                     f"{num_heads}")


def source_target_names(model_config, info) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(source, target) modality names from config.model, checked against info."""
  src = tuple(model_config.source_modalities)
  tgt = tuple(model_config.target_modalities)
  bad = [n for n in src + tgt if n not in info.modalities]
  if bad or not src or not tgt or set(src) & set(tgt):
    raise ValueError(
        f"model.source_modalities {src} and target_modalities {tgt} must be "
        f"non-empty, disjoint and among the data's modalities {info.modalities}")
  return src, tgt


def build_translator(model_config, info) -> Translator:
  """Translator from config.model (variant, patch_size, attention, modality
  names, modality_dropout) and a DatasetInfo."""
  src, tgt = source_target_names(model_config, info)
  variant = decode_variant(model_config.variant)
  width, heads = variant.width, variant.num_heads[0]
  patch = int(model_config.patch_size)
  check_translator_config(info.spatial_shape, patch_size=patch,
                          attention=str(model_config.attention),
                          window_size=int(model_config.window_size),
                          width=width, num_heads=heads)
  return Translator(
      spatial_shape=tuple(info.spatial_shape), source_modalities=src,
      num_target_channels=len(tgt), conditions=tuple(info.conditions),
      width=width, depth=int(sum(variant.depth)), num_heads=heads,
      encoder_depth=int(model_config.encoder_depth),
      patch_size=patch, attention=str(model_config.attention),
      window_size=int(model_config.window_size),
      mlp_ratio=float(model_config.mlp_ratio), qk_norm=bool(model_config.qk_norm),
      chunk_size=model_config.chunk_size, cond_dim=int(model_config.cond_dim),
      cond_dropout=float(model_config.cond_dropout),
      modality_dropout=float(model_config.modality_dropout),
      refine_width=variant.min_width, dtype=parse_dtype(model_config.dtype))
