"""Generator size presets as data (big_vision's `decode_variant` idea).

A variant fixes widths and depths; resolution, attention kind and the
number of attention stages come from the config, so one preset serves 2D and
3D data of any size. Width halves at every x2 upsampling (the token count
grows by 2**ndim, so compute per stage stays roughly flat) down to
`min_width`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Variant:
  """Sizes of one generator preset.

  Attributes:
    width: channels at the first (token grid) stage.
    depth: transformer blocks per attention stage (stage 0 first).
    num_heads: attention heads per attention stage.
    conv_depth: residual conv blocks per stage without attention (and per
      stage of the CNN generator).
    min_width: floor of the halving channel widths.
  """
  width: int
  depth: tuple[int, ...]
  num_heads: tuple[int, ...]
  conv_depth: int
  min_width: int

  def stage_width(self, stage: int) -> int:
    """Channels at stage `stage` (0 = token grid)."""
    return max(self.width >> stage, self.min_width)


VARIANTS: dict[str, Variant] = {
    # Tests: a few thousand FLOPs per token.
    "Ti": Variant(width=32, depth=(1, 1, 1), num_heads=(2, 2, 1),
                  conv_depth=1, min_width=8),
    # Default: sized so a 64x64 GAN step at batch 32 fits the 2-core CPU
    # budget (see the model tests / report for measured numbers).
    "S": Variant(width=128, depth=(2, 1, 1), num_heads=(4, 2, 1),
                 conv_depth=1, min_width=16),
    # Accelerators.
    "B": Variant(width=384, depth=(4, 4, 2), num_heads=(6, 6, 3),
                 conv_depth=2, min_width=32),
}


def decode_variant(name: str) -> Variant:
  """Looks up a preset by name ('Ti', 'S', 'B')."""
  if name not in VARIANTS:
    raise ValueError(f"unknown model variant {name!r}; valid: "
                     f"{sorted(VARIANTS)}")
  return VARIANTS[name]


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(name: str) -> Any:
  """Compute dtype from its config name ('float32' | 'bfloat16')."""
  if name not in _DTYPES:
    raise ValueError(f"unknown model dtype {name!r}; valid: {sorted(_DTYPES)}")
  return _DTYPES[name]
