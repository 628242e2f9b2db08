"""Linen attention layers: projections around the pure attention variants.

Modules own parameters only; the attention itself is a registry entry's
function (`ATTENTION_VARIANTS`, one signature) and the entry's traits decide
windows, shifts and the relative bias, so adding a variant touches no layer.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax.attention.functional import full_attention
from medgen_jax.attention.position import RelativePositionBias
from medgen_jax.attention.registry import check_window, get_attention
from medgen_jax.conditioning import AttentionGate

Array = jax.Array


def _window_tuple(window_size: int | Sequence[int], num: int) -> tuple[int, ...]:
  if isinstance(window_size, int):
    return (window_size,) * num
  window = tuple(window_size)
  if len(window) != num:
    raise ValueError(f"window_size {window} needs one entry per spatial axis ({num})")
  return window


def resolve_shift(attention: str, window: Sequence[int],
                  shift: int | Sequence[int] | None,
                  grid: Sequence[int] | None = None) -> tuple[int, ...]:
  """Per-axis shift: explicit value, else window // 2 for a shifted variant, else 0.

  With `grid` (the token grid's spatial sizes) the shift is 0 along every axis
  that the window covers whole, whether explicit or not: such a window has no
  neighbour to exchange tokens with, and shifting it would only split it at
  the roll border (as `half_window_shift` does for the functional variant).
  """
  if shift is None:
    shifted = get_attention(attention).shifted
    shifts = tuple(w // 2 if shifted else 0 for w in window)
  else:
    shifts = _window_tuple(shift, len(window))
  if grid is not None:
    shifts = tuple(0 if w >= size else s for s, w, size in zip(shifts, window, grid))
  return shifts


class MultiHeadAttention(nn.Module):
  """Self- (or cross-) attention over `[batch, *spatial, channels]` tokens.

  Attributes:
    num_heads: heads; channels must be divisible by it.
    attention: a key of `ATTENTION_VARIANTS`: 'full' (flattened grid), 'axial'
      (every head attends along each spatial axis in turn and the per-axis
      outputs are summed, so one layer sees the token's full row, column and,
      in 3D, depth line), 'window' or 'window_shifted' (Swin).
    window_size: int or per-axis window for the windowed variants.
    shift: per-axis cyclic shift for windowed variants; None = window // 2 for
      a shifted variant ('window_shifted') and 0 otherwise. Along an axis the
      window covers whole the shift is always 0 (see `resolve_shift`).
    qk_norm: LayerNorm over head_dim on q and k (stabilises large logits).
    chunk_size: memory-efficient blocks for 'full' / 'axial' (see `full_attention`).
    use_relative_bias: learned Swin `RelativePositionBias` for variants that
      accept a bias.
    out_features: output channels (default: input channels).
    dropout_rate: dropout on the output projection.
    dtype: computation dtype; parameters stay `param_dtype`.
    attention_fn: replaces the registry entry's function for self-attention
      (same signature), e.g. a sequence-parallel version from
      `SequenceSharding.attention_fn`; None = the registry's. Owns no
      parameters, so checkpoints load either way.
  """
  num_heads: int
  attention: str = "full"
  window_size: int | Sequence[int] = 8
  shift: int | Sequence[int] | None = None
  qk_norm: bool = False
  chunk_size: int | Sequence[int] | None = None
  use_relative_bias: bool = True
  out_features: int | None = None
  dropout_rate: float = 0.0
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_fn: Callable[..., Array] | None = None

  def _check(self, x: Array, context: Array | None) -> None:
    variant = get_attention(self.attention)
    if x.ndim < 3:
      raise ValueError(f"MultiHeadAttention expects x [batch, *spatial, channels]; "
                       f"got shape {x.shape}")
    if x.shape[-1] % self.num_heads:
      raise ValueError(f"channels {x.shape[-1]} not divisible by num_heads {self.num_heads}")
    spatial = x.shape[1:-1]
    if not variant.flat and len(spatial) not in (2, 3):
      raise ValueError(f"attention {self.attention!r} needs 2 or 3 spatial dims; "
                       f"got x of shape {x.shape}")
    if context is not None:
      if not variant.flat:
        raise ValueError(f"context (cross-attention) needs a flat variant such as "
                         f"attention='full'; got {self.attention!r}")
      if context.ndim != 3 or context.shape[0] != x.shape[0]:
        raise ValueError(f"context must be [batch, tokens, channels] with batch "
                         f"{x.shape[0]}; got shape {context.shape}")
    check_window(self.attention, self.window_size, spatial)
    if not variant.windowed and self.shift not in (None, 0):
      raise ValueError(f"shift={self.shift} only applies to windowed attention, not "
                       f"{self.attention!r}")

  @nn.compact
  def __call__(self, x: Array, *, context: Array | None = None,
               deterministic: bool) -> Array:
    """x `[batch, *spatial, C]`, context `[batch, M, C_ctx]` or None -> `[batch, *spatial, C_out]`."""
    self._check(x, context)
    channels = x.shape[-1]
    head_dim = channels // self.num_heads
    q, k, v = _project_qkv(self, x, x if context is None else context, use_bias=self.use_bias)

    if context is not None:
      b = x.shape[0]
      out = full_attention(q.reshape(b, -1, self.num_heads, head_dim), k, v,
                           chunk_size=self.chunk_size).reshape(q.shape)
    else:
      variant = get_attention(self.attention)
      bias, shift = None, None
      if variant.windowed:
        window = _window_tuple(self.window_size, x.ndim - 2)
        shift = resolve_shift(self.attention, window, self.shift, grid=x.shape[1:-1])
        if variant.accepts_bias and self.use_relative_bias:
          bias = RelativePositionBias(self.num_heads, window, name="relative_bias")()
          bias = bias.astype(self.dtype)
      attend = self.attention_fn or variant.fn
      out = attend(
          q, k, v, window_size=self.window_size, shift=shift, bias=bias,
          chunk_size=self.chunk_size)
    out = nn.DenseGeneral(self.out_features or channels, axis=(-2, -1),
                          use_bias=self.use_bias, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="out")(out)
    return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)


def _project_qkv(module: nn.Module, queries_from: Array, keys_from: Array, *,
                 use_bias: bool) -> tuple[Array, Array, Array]:
  """Per-head q, k, v projections (+ optional qk LayerNorm) inside `module`'s compact call.

  Shared by `MultiHeadAttention` and `CrossModalAttention` so both keep the
  same parameter names (query_proj / key_proj / value_proj, query_norm /
  key_norm) and both sow the projected q/k that attention maps are rendered
  from at inference (`mutable=['intermediates']`; names 'query'/'key').

  Args:
    module: the calling attention module (num_heads, qk_norm, dtype, param_dtype).
    queries_from: `[batch, ..., C]` tokens the queries are projected from.
    keys_from: `[batch, ..., C']` tokens keys and values are projected from.
    use_bias: bias in the projections.

  Returns:
    q `[*queries_from.shape[:-1], heads, head_dim]`, k and v
    `[*keys_from.shape[:-1], heads, head_dim]`.
  """
  head_dim = queries_from.shape[-1] // module.num_heads
  dense = lambda name: nn.DenseGeneral(
      (module.num_heads, head_dim), use_bias=use_bias, dtype=module.dtype,
      param_dtype=module.param_dtype, name=name)
  q = dense("query_proj")(queries_from)
  k, v = dense("key_proj")(keys_from), dense("value_proj")(keys_from)
  if module.qk_norm:
    norm = lambda name: nn.LayerNorm(dtype=module.dtype, param_dtype=module.param_dtype,
                                     name=name)
    q, k = norm("query_norm")(q), norm("key_norm")(k)
  module.sow("intermediates", "query", q)
  module.sow("intermediates", "key", k)
  return q, k, v


class CrossModalAttention(nn.Module):
  """Fuses two modalities: queries from x, keys/values from x and the context.

  As in CT+PET fusion, each token of one modality attends over both token
  sets. Missing context tokens (e.g. an absent PET scan) are masked out of the
  softmax, never zero-filled.

  Attributes mirror `MultiHeadAttention` (full attention only).
  """
  num_heads: int
  qk_norm: bool = False
  chunk_size: int | Sequence[int] | None = None
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context_tokens: Array, *,
               context_mask: Array | None = None, deterministic: bool) -> Array:
    """Args:
      x: `[batch, *spatial, C]` (or `[batch, N, C]`) query-modality tokens.
      context_tokens: `[batch, M, C]` other-modality tokens.
      context_mask: bool `[batch, M]`, True where a context token is present.

    Returns:
      `[batch, *spatial, C]`.
    """
    if x.ndim < 3 or context_tokens.ndim != 3:
      raise ValueError(f"CrossModalAttention expects x [batch, ..., C] and context_tokens "
                       f"[batch, M, C]; got {x.shape} and {context_tokens.shape}")
    b, c = x.shape[0], x.shape[-1]
    if context_tokens.shape[0] != b or context_tokens.shape[-1] != c:
      raise ValueError(f"context_tokens {context_tokens.shape} must match x {x.shape} in "
                       f"batch and channels")
    if context_mask is not None and context_mask.shape != context_tokens.shape[:2]:
      raise ValueError(f"context_mask must be [batch, M] = {context_tokens.shape[:2]}; "
                       f"got {context_mask.shape}")
    if c % self.num_heads:
      raise ValueError(f"channels {c} not divisible by num_heads {self.num_heads}")
    tokens = x.reshape(b, -1, c)
    both = jnp.concatenate([tokens, context_tokens.astype(tokens.dtype)], axis=1)
    q, k, v = _project_qkv(self, tokens, both, use_bias=True)
    mask = None
    if context_mask is not None:
      # x's own tokens are always visible, so no query row is ever fully masked.
      keep = jnp.concatenate([jnp.ones(tokens.shape[:2], bool), context_mask.astype(bool)], 1)
      mask = keep[:, None, None, :]
    out = full_attention(q, k, v, mask=mask, chunk_size=self.chunk_size)
    out = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype,
                          param_dtype=self.param_dtype, name="out")(out)
    out = nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)
    return out.reshape(x.shape[:-1] + (c,))


class Mlp(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout, channels last."""
  hidden: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    out_dim = x.shape[-1]
    x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype)(x))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(out_dim, dtype=self.dtype)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  expand = lambda t: t.reshape((t.shape[0],) + (1,) * (x.ndim - 2) + (t.shape[-1],))
  return x * (1.0 + expand(scale)) + expand(shift)


def _gated(x: Array, gate: Array) -> Array:
  return x * gate.reshape((gate.shape[0],) + (1,) * (x.ndim - 2) + (gate.shape[-1],))


class TransformerBlock(nn.Module):
  """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)).

  With `cond` `[batch, D_cond]` the block is adaLN-Zero (DiT): the LayerNorms
  lose their affine parameters and each branch is modulated and gated by an
  `AttentionGate`; the gates start at zero, so a fresh block is the identity.

  Attributes:
    num_heads, attention, window_size, shift, qk_norm, chunk_size: see
      `MultiHeadAttention` (a shifted variant uses shift = window // 2, and no
      block shifts along an axis its window covers whole).
    mlp_ratio: MLP hidden width / channels.
    dropout_rate: dropout in attention output and MLP.
    attention_fn: see `MultiHeadAttention` (None = the registry entry's function).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  attention: str = "full"
  window_size: int | Sequence[int] = 8
  shift: int | Sequence[int] | None = None
  dropout_rate: float = 0.0
  qk_norm: bool = False
  chunk_size: int | Sequence[int] | None = None
  dtype: Any = jnp.float32
  attention_fn: Callable[..., Array] | None = None

  @nn.compact
  def __call__(self, x: Array, cond: Array | None = None, *, deterministic: bool) -> Array:
    """x `[batch, *spatial, C]`, cond `[batch, D_cond]` or None -> `[batch, *spatial, C]`."""
    if cond is not None and (cond.ndim != 2 or cond.shape[0] != x.shape[0]):
      raise ValueError(f"cond must be [batch, D_cond] with batch {x.shape[0]}; "
                       f"got shape {cond.shape}")
    channels = x.shape[-1]
    affine = cond is None
    norm = lambda name: nn.LayerNorm(use_scale=affine, use_bias=affine, dtype=self.dtype,
                                     name=name)
    attn = MultiHeadAttention(
        self.num_heads, attention=self.attention, window_size=self.window_size,
        shift=self.shift, qk_norm=self.qk_norm, chunk_size=self.chunk_size,
        dropout_rate=self.dropout_rate, dtype=self.dtype, attention_fn=self.attention_fn,
        name="attention")
    mlp = Mlp(int(round(self.mlp_ratio * channels)), self.dropout_rate, self.dtype, name="mlp")
    if cond is None:
      x = x + attn(norm("norm_attention")(x), deterministic=deterministic)
      return x + mlp(norm("norm_mlp")(x), deterministic=deterministic)
    shift, scale, gate = AttentionGate(channels, dtype=self.dtype, name="gate_attention")(cond)
    h = _modulate(norm("norm_attention")(x), shift, scale)
    x = x + _gated(attn(h, deterministic=deterministic), gate)
    shift, scale, gate = AttentionGate(channels, dtype=self.dtype, name="gate_mlp")(cond)
    h = _modulate(norm("norm_mlp")(x), shift, scale)
    return x + _gated(mlp(h, deterministic=deterministic), gate)
