"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) for 2D and 3D images.

Sampling the random parameters and applying them are separate functions: the
training step draws parameters for the whole *global* batch from the step RNG
and each device applies its slice, so every parallel mode augments example i
the same way. All ops are differentiable w.r.t. the images (the generator is
trained through them) and act on `[batch, *spatial, channels]` with 2 or 3
spatial dims.

Policy strings are comma-separated op names, e.g. 'translation,cutout,intensity'
('' = no augmentation); the same policy is applied to real and fake images.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

TRANSLATION_RATIO = 0.125  # DiffAugment's default: shift up to 1/8 of the size.
CUTOUT_RATIO = 0.5         # DiffAugment's default: erase a box half the size.

Params = dict[str, jax.Array]


def _translation_pad(size: int) -> int:
  return int(size * TRANSLATION_RATIO + 0.5)


def _sample_translation(rng: jax.Array, batch: int, spatial: Sequence[int]) -> Params:
  bounds = jnp.array([_translation_pad(s) for s in spatial], jnp.int32)
  shift = jax.random.randint(rng, (batch, len(spatial)), -bounds, bounds + 1)
  return {"shift": shift}


def translate(images: jax.Array, shift: jax.Array, *, pad_mode: str) -> jax.Array:
  """Moves each image by an integer shift: out[i] = in[i - shift].

  Args:
    images: `[batch, *spatial, C]`.
    shift: int `[batch, num_spatial_dims]`, |shift| <= the translation pad.
    pad_mode: 'zero' (fill with 0) or 'edge' (repeat the border).
  """
  spatial = images.shape[1:-1]
  pads = [_translation_pad(s) for s in spatial]
  mode = {"zero": "constant", "edge": "edge"}[pad_mode]

  def one(x, s):
    xp = jnp.pad(x, [(p, p) for p in pads] + [(0, 0)], mode=mode)
    starts = [p - s[i] for i, p in enumerate(pads)] + [0]
    return jax.lax.dynamic_slice(xp, starts, x.shape)

  return jax.vmap(one)(images, shift)


def _sample_cutout(rng: jax.Array, batch: int, spatial: Sequence[int]) -> Params:
  sizes = jnp.array(spatial, jnp.int32)
  center = jax.random.randint(rng, (batch, len(spatial)), 0, sizes)
  return {"center": center}


def cutout(images: jax.Array, center: jax.Array) -> jax.Array:
  """Zeroes a box of CUTOUT_RATIO * size per axis centred at `center` `[batch, nd]`."""
  batch, spatial = images.shape[0], images.shape[1:-1]
  inside = jnp.ones((batch,) + tuple(spatial), bool)
  for axis, size in enumerate(spatial):
    box = int(size * CUTOUT_RATIO + 0.5)
    lo = center[:, axis] - box // 2
    idx = jnp.arange(size)[None]
    in_axis = (idx >= lo[:, None]) & (idx < lo[:, None] + box)   # [batch, size]
    shape = [batch] + [1] * len(spatial)
    shape[axis + 1] = size
    # A voxel is erased only if it lies inside the box along every axis.
    inside = inside & in_axis.reshape(shape)
  return images * (~inside)[..., None].astype(images.dtype)


def _sample_intensity(rng: jax.Array, batch: int, spatial: Sequence[int]) -> Params:
  del spatial
  kb, kc = jax.random.split(rng)
  return {"brightness": jax.random.uniform(kb, (batch,), minval=-0.5, maxval=0.5),
          "contrast": jax.random.uniform(kc, (batch,), minval=0.5, maxval=1.5)}


def intensity(images: jax.Array, brightness: jax.Array, contrast: jax.Array) -> jax.Array:
  """x + b, then (x - mean) * c + mean per example (DiffAugment's color ops for [-1, 1])."""
  bshape = (-1,) + (1,) * (images.ndim - 1)
  x = images + brightness.reshape(bshape).astype(images.dtype)
  mean = jnp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)
  return (x - mean) * contrast.reshape(bshape).astype(images.dtype) + mean


class AugmentOp(NamedTuple):
  sample: Callable[[jax.Array, int, Sequence[int]], Params]
  apply: Callable[..., jax.Array]


AUGMENT_OPS: dict[str, AugmentOp] = {
    "translation": AugmentOp(_sample_translation, functools.partial(translate, pad_mode="zero")),
    "translation_edge": AugmentOp(_sample_translation, functools.partial(translate, pad_mode="edge")),
    "cutout": AugmentOp(_sample_cutout, cutout),
    "intensity": AugmentOp(_sample_intensity, intensity),
}


def parse_policy(policy: str) -> tuple[str, ...]:
  """'translation, cutout' -> ('translation', 'cutout'); raises on unknown names."""
  ops = tuple(p.strip() for p in policy.split(",") if p.strip())
  unknown = [op for op in ops if op not in AUGMENT_OPS]
  if unknown:
    raise ValueError(f"unknown augmentation op(s) {unknown} in loss.augment={policy!r}; "
                     f"expected a comma-separated subset of {sorted(AUGMENT_OPS)}")
  return ops


def sample_params(rng: jax.Array, policy: str, batch: int,
                  spatial: Sequence[int]) -> dict[str, Params]:
  """Random parameters for every op of `policy`, one set per example."""
  ops = parse_policy(policy)
  keys = jax.random.split(rng, max(len(ops), 1))
  return {op: AUGMENT_OPS[op].sample(k, batch, tuple(spatial)) for op, k in zip(ops, keys)}


def apply_params(images: jax.Array, params: dict[str, Params], policy: str) -> jax.Array:
  """Applies the ops of `policy` in order with pre-drawn `params` to `[batch, *spatial, C]`."""
  if images.ndim not in (4, 5):
    raise ValueError(f"augment expects [batch, *spatial, C] with 2 or 3 spatial dims, "
                     f"got shape {images.shape}")
  for op in parse_policy(policy):
    images = AUGMENT_OPS[op].apply(images, **params[op])
  return images


def augment(images: jax.Array, rng: jax.Array, policy: str) -> jax.Array:
  """Samples parameters from `rng` and augments `images` `[batch, *spatial, C]`."""
  params = sample_params(rng, policy, images.shape[0], images.shape[1:-1])
  return apply_params(images, params, policy)
