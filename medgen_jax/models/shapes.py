"""Resolution arithmetic shared by the generators: token grid -> data size.

Both generators start from a small grid and double every spatial axis once
per stage until they reach the data resolution, so the data size must be the
grid times a power of two. Checking this here, from `DatasetInfo` alone,
turns a bad config into one clear message before anything is traced.
"""
from __future__ import annotations

from typing import Sequence

from medgen_jax.attention.registry import check_window


def upsampling_plan(spatial_shape: Sequence[int],
                    token_grid: int) -> tuple[tuple[int, ...], int]:
  """The starting grid and the number of x2 upsamplings to reach the data.

  `token_grid` is the side of the smallest spatial axis at the first stage;
  longer axes (e.g. 32x64x64 volumes) keep their aspect ratio, so a cube
  grid comes out for cube data and the grid is `token_grid ** ndim` tokens.

  Args:
    spatial_shape: (H, W) or (D, H, W) of the data.
    token_grid: side of the initial token grid along the smallest axis.

  Returns:
    (grid, num_upsamplings): grid per axis, with
    `grid[i] * 2 ** num_upsamplings == spatial_shape[i]`.

  Raises:
    ValueError: unsupported rank, or sizes that are not the grid times a
      power of two.
  """
  spatial_shape = tuple(int(s) for s in spatial_shape)
  if len(spatial_shape) not in (2, 3):
    raise ValueError(f"generators support 2 or 3 spatial dims, got spatial "
                     f"shape {spatial_shape}")
  if token_grid < 1:
    raise ValueError(f"token_grid must be >= 1, got {token_grid}")
  smallest = min(spatial_shape)
  ratio = smallest // token_grid
  if smallest % token_grid or ratio & (ratio - 1):
    raise ValueError(
        f"image size {spatial_shape} is not token_grid={token_grid} times a "
        f"power of two along its smallest axis ({smallest} / {token_grid} = "
        f"{smallest / token_grid:g}); pick a token_grid such that "
        f"{smallest} = token_grid * 2**k")
  num_up = ratio.bit_length() - 1
  factor = 2 ** num_up
  bad = [s for s in spatial_shape if s % factor]
  if bad:
    raise ValueError(f"image size {spatial_shape}: axes {bad} are not "
                     f"divisible by 2**{num_up} = {factor} (token_grid="
                     f"{token_grid} on the smallest axis needs {num_up} "
                     f"upsamplings)")
  return tuple(s // factor for s in spatial_shape), num_up


def stage_grids(grid: Sequence[int], num_up: int) -> tuple[tuple[int, ...], ...]:
  """Grid per stage: `num_up + 1` stages, each axis doubling per stage."""
  return tuple(tuple(g * 2 ** k for g in grid) for k in range(num_up + 1))


def check_windows(grids: Sequence[Sequence[int]], attention: str,
                  window_size: int) -> None:
  """`check_window` on every attention stage's grid.

  Args:
    grids: the grid of each stage that uses attention.
    attention: attention variant name.
    window_size: window side.

  Raises:
    ValueError: a windowed variant's window is larger than, or does not
      divide, a grid axis.
  """
  for stage, grid in enumerate(grids):
    check_window(attention, window_size, grid, where=f" of attention stage {stage}")
