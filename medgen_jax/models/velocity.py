"""DiT-style velocity network for flow matching, on the GAN generator's blocks.

    x_t [B, *spatial, C], t [B], conditions
      -> patches: space-to-depth by p, Dense -> tokens [B, *grid, width]
         (+ the generator's position encoding)
      -> style s = StyleMapping(timestep embedding(t), condition embedding)
      -> the generator's attention stage: TransformerBlocks (adaLN-Zero on s,
         full / axial / window / window_shifted, 2D or 3D)
      -> modulated norm, zero-initialised Dense, depth-to-space by p
      -> velocity [B, *spatial, C]

`FlowGenerator` subclasses `TransformerGenerator`, so the position encoding
and the attention stage (block naming, Swin shift alternation, sequence
sharding) are the generator's methods, not copies; the condition embedding
and the style MLP are the GAN stem's modules with the timestep embedding in
the place of z. It keeps the generator interface: `__call__(z, conditions,
*, train)` reshapes `z [B, prod(image_shape)]` to a noise image and
integrates the ODE from t = 1 to t = 0 (`models.ode`), with classifier-free
guidance against the null condition embeddings, so sampling, evaluation and
the precision table use it like any generator. Training calls
`apply(..., method='velocity')`; both methods share one parameter tree.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax.attention.registry import get_attention
from medgen_jax.models import ode, shapes
from medgen_jax.models.condition import condition_embedding
from medgen_jax.models.generator import POSITION_ENCODINGS, TransformerGenerator
from medgen_jax.models.hourglass import Hourglass, HourglassSpec, check_spec, spec_from_config
from medgen_jax.models.layers import (ModulatedNorm, StyleMapping, pixel_shuffle,
                                      space_to_depth)
from medgen_jax.models.variants import Variant, decode_variant, parse_dtype


def null_conditions(conditions: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Every condition set to unknown: -1 for integer fields, NaN for float ones.

  The condition embedding maps these to its learned null vectors, the
  unconditional branch of classifier-free guidance.
  """
  return {k: (jnp.full_like(v, jnp.nan) if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)
              else jnp.full_like(v, -1))
          for k, v in conditions.items()}


def timestep_embedding(t: jax.Array, dim: int, *, max_period: float = 10_000.0
                       ) -> jax.Array:
  """Sinusoidal features of t in [0, 1]: `[B]` -> `[B, dim]` (dim even).

  t is scaled by 1000 first (DiT's integer timesteps), so the lowest
  frequencies still turn by several radians over [0, 1].
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def patch_grid(spatial_shape: tuple[int, ...], token_grid: int) -> tuple[tuple[int, ...], int]:
  """(token grid per axis, patch side): `token_grid` tokens along the smallest axis.

  Raises:
    ValueError: the smallest axis is not a multiple of token_grid, or another
      axis not a multiple of the patch side.
  """
  spatial_shape = tuple(int(s) for s in spatial_shape)
  if len(spatial_shape) not in (2, 3):
    raise ValueError(f"the velocity network supports 2 or 3 spatial dims, got "
                     f"{spatial_shape}")
  smallest = min(spatial_shape)
  if token_grid < 1 or smallest % token_grid:
    raise ValueError(f"image size {spatial_shape}: the smallest axis {smallest} is not "
                     f"a multiple of token_grid={token_grid}")
  patch = smallest // token_grid
  bad = [s for s in spatial_shape if s % patch]
  if bad:
    raise ValueError(f"image size {spatial_shape}: axes {bad} are not multiples of "
                     f"the patch side {patch} (= {smallest} / token_grid)")
  return tuple(s // patch for s in spatial_shape), patch


def check_config(spatial_shape: tuple[int, ...], variant: Variant, *, token_grid: int,
                 attention: str, window_size: int, position_encoding: str,
                 num_steps: int, solver: str, guidance_scale: float) -> None:
  """One clear ValueError if the sizes or sampler settings cannot work."""
  get_attention(attention)
  if position_encoding not in POSITION_ENCODINGS:
    raise ValueError(f"unknown position_encoding {position_encoding!r}; valid: "
                     f"{list(POSITION_ENCODINGS)}")
  grid, _ = patch_grid(spatial_shape, token_grid)
  shapes.check_windows([grid], attention, window_size)
  width, heads = variant.width, variant.num_heads[0]
  if width % heads:
    raise ValueError(f"variant: width {width} is not divisible by num_heads {heads}")
  if position_encoding == "sinusoidal" and width % (2 * len(grid)):
    raise ValueError(f"sinusoidal position encoding needs width {width} divisible by "
                     f"2 * {len(grid)}")
  if num_steps < 1 or solver not in ode.SOLVERS:
    raise ValueError(f"sampler: num_steps {num_steps} must be >= 1 and solver "
                     f"{solver!r} one of {ode.SOLVERS}")
  if not guidance_scale >= 0:
    raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")


class FlowGenerator(TransformerGenerator):
  """Velocity network v(x_t, t, c) and its ODE sampler (z, c) -> image.

  Attributes (besides `TransformerGenerator`'s; `variant.depth[0]` blocks
  at one token resolution, `attention_stages` unused):
    num_steps: solver steps from t = 1 to 0 when sampling.
    solver: 'euler' | 'heun'.
    guidance_scale: classifier-free guidance weight (1 = conditional
      velocity only, one network call per evaluation; otherwise the batch is
      doubled with the null conditions).
    backbone: None = the DiT stage above; an `HourglassSpec` = the hourglass
      of token levels (`models.hourglass`) on the same style vector.
  """
  num_steps: int = 16
  solver: str = "euler"
  guidance_scale: float = 1.0
  backbone: HourglassSpec | None = None

  @property
  def latent_dim(self) -> int:
    """Size of z: the flattened noise image."""
    return math.prod(self.spatial_shape) * self.num_channels

  @nn.compact
  def velocity(self, x: jax.Array, t: jax.Array, conditions: Mapping[str, jax.Array], *,
               train: bool) -> jax.Array:
    """The velocity field.

    Args:
      x: `[B, *spatial_shape, num_channels]` the state x_t.
      t: `[B]` times in [0, 1] (1 = noise).
      conditions: name -> `[B]` (-1 / NaN = unknown: the null embedding).
      train: condition dropout on (the 'dropout' stream).

    Returns:
      `[B, *spatial_shape, num_channels]` float32.
    """
    chex.assert_shape(x, (None, *self.spatial_shape, self.num_channels))
    chex.assert_shape(t, (x.shape[0],))
    grid, patch = patch_grid(self.spatial_shape, self.token_grid)
    width = self.variant.width
    missing = [f.name for f in self.conditions if f.name not in conditions]
    if missing:
      raise ValueError(f"velocity: conditions {missing} missing; got {sorted(conditions)}")
    embed = condition_embedding(self.conditions, self.cond_dim,
                                dropout_rate=self.cond_dropout, name="condition_embedding")
    cond = None
    if embed is not None:
      cond = embed({f.name: conditions[f.name] for f in self.conditions},
                   train=train).astype(self.dtype)
    t_emb = timestep_embedding(t, 2 * (self.cond_dim // 2)).astype(self.dtype)
    style = StyleMapping(self.cond_dim, dtype=self.dtype, name="mapping")(t_emb, cond)
    if self.backbone is not None:
      return Hourglass(self.backbone, self.num_channels, self.dtype,
                       name="hourglass")(x, style, train=train)
    h = space_to_depth(x.astype(self.dtype), patch) if patch > 1 else x.astype(self.dtype)
    h = nn.Dense(width, dtype=self.dtype, name="patch_embed")(h)
    h = h + self._position(grid, width, 0)
    h = self._attention_stage(h, style, 0, train=train)
    h = ModulatedNorm(dtype=self.dtype, name="head_norm")(h, style)
    # Zero-initialised (DiT): the fresh network predicts v = 0 everywhere.
    h = nn.Dense(patch ** len(grid) * self.num_channels, dtype=self.dtype,
                 kernel_init=nn.initializers.zeros, name="head")(h)
    out = pixel_shuffle(h, patch) if patch > 1 else h
    return out.astype(jnp.float32)

  def __call__(self, z: jax.Array, conditions: Mapping[str, jax.Array], *,
               train: bool) -> jax.Array:
    """Samples images by integrating the ODE from the noise z.

    Args:
      z: `[B, latent_dim]` standard normal noise (the image at t = 1, flat).
      conditions: name -> `[B]`.
      train: must be False outside initialisation (sampling is inference).

    Returns:
      `[B, *spatial_shape, num_channels]` float32, clipped to [-1, 1] (the
      GAN generator's tanh range, which the evaluation expects).
    """
    chex.assert_shape(z, (None, self.latent_dim))
    x1 = z.reshape(z.shape[0], *self.spatial_shape, self.num_channels).astype(jnp.float32)
    if self.is_initializing():
      # One evaluation creates every parameter; no ODE at init.
      return self.velocity(x1, jnp.ones((z.shape[0],), jnp.float32), conditions,
                           train=train)
    # Linen submodules cannot be called inside a raw lax.scan: the solver gets
    # a pure function of this module's parameters instead.
    net, variables = self.clone(parent=None), {"params": self.variables["params"]}
    null = null_conditions(conditions)
    guided = self.guidance_scale != 1.0

    def velocity_fn(x, t):
      if not guided:
        return net.apply(variables, x, t, conditions, train=False, method="velocity")
      both = {k: jnp.concatenate([conditions[k], null[k]]) for k in conditions}
      v = net.apply(variables, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both,
                    train=False, method="velocity")
      v_cond, v_null = jnp.split(v, 2)
      return ode.guide(v_cond, v_null, self.guidance_scale)

    x0 = ode.integrate(velocity_fn, x1, num_steps=self.num_steps, solver=self.solver)
    return jnp.clip(x0, -1.0, 1.0)


def build_flow_generator(model_config, info) -> FlowGenerator:
  """FlowGenerator from `config.model` and a `DatasetInfo`, validated first.

  Reads the transformer keys of the GAN config (`variant` for width and
  heads, `token_grid` = tokens along the smallest axis, `attention`,
  `window_size`, `mlp_ratio`, `cond_dim`, `cond_dropout`, `qk_norm`,
  `chunk_size`, `position_encoding`, `dtype`) and the flow keys `depth`
  (blocks), `sample_steps`, `solver`, `guidance_scale`; `backbone='hourglass'`
  reads `model.hourglass` (`models.hourglass.spec_from_config`).
  """
  variant = dataclasses.replace(decode_variant(model_config.variant),
                                depth=(int(model_config.depth),))
  kwargs = dict(
      token_grid=int(model_config.token_grid), attention=str(model_config.attention),
      window_size=int(model_config.window_size),
      position_encoding=str(model_config.position_encoding))
  sampler = dict(num_steps=int(model_config.sample_steps), solver=str(model_config.solver),
                 guidance_scale=float(model_config.guidance_scale))
  check_config(tuple(info.spatial_shape), variant, **kwargs, **sampler)
  backbone, name = None, str(model_config.backbone)
  if name not in ("dit", "hourglass"):
    raise ValueError(f"unknown model.backbone {name!r}; valid: 'dit', 'hourglass'")
  if name == "hourglass":
    backbone = spec_from_config(
        model_config.hourglass, attention=kwargs["attention"], window_size=kwargs["window_size"],
        mlp_ratio=float(model_config.mlp_ratio), qk_norm=bool(model_config.qk_norm))
    check_spec(tuple(info.spatial_shape), backbone)
  latent = math.prod(info.image_shape)
  if int(model_config.latent_dim) != latent:
    raise ValueError(f"model.latent_dim {model_config.latent_dim} must be the image size "
                     f"{tuple(info.image_shape)} = {latent}: a flow generator's noise is "
                     f"the image at t = 1")
  return FlowGenerator(
      spatial_shape=tuple(info.spatial_shape), num_channels=info.num_channels,
      conditions=tuple(info.conditions), variant=variant, attention_stages=1,
      mlp_ratio=float(model_config.mlp_ratio), cond_dim=int(model_config.cond_dim),
      cond_dropout=float(model_config.cond_dropout), qk_norm=bool(model_config.qk_norm),
      chunk_size=model_config.chunk_size, dtype=parse_dtype(model_config.dtype),
      backbone=backbone, **kwargs, **sampler)
