"""Volume figures: orthogonal slices and maximum-intensity projections.

One row per volume (real rows first, then generated), columns axial /
coronal / sagittal central slices and the coronal maximum-intensity
projection (MIP: the brightest voxel along each ray, how PET and CT
angiography are read), for one channel in display units.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from medgen_jax.data.info import DatasetInfo
from medgen_jax.viz import CT_WINDOWS

VIEWS = ("axial", "coronal", "sagittal", "mip")


def orthogonal_views(volume: np.ndarray, *, index: Sequence[int] | None = None
                     ) -> dict[str, np.ndarray]:
  """Central slices and the coronal MIP of one volume `[D, H, W]`.

  Args:
    volume: `[D, H, W]`.
    index: (d, h, w) slice indices; None = the centre.

  Returns:
    {'axial': [H, W] at d, 'coronal': [D, W] at h, 'sagittal': [D, H] at w,
    'mip': [D, W] maximum over H}.
  """
  volume = np.asarray(volume)
  if volume.ndim != 3:
    raise ValueError(f"orthogonal_views expects [D, H, W], got {volume.shape}")
  d, h, w = index if index is not None else [s // 2 for s in volume.shape]
  return {"axial": volume[d], "coronal": volume[:, h], "sagittal": volume[:, :, w],
          "mip": volume.max(axis=1)}


def _display_range(info: DatasetInfo, channel: int, ct_window: str) -> tuple[float, float]:
  t = info.intensity[channel]
  if t.modality == "ct" and ct_window in CT_WINDOWS:
    level, width = CT_WINDOWS[ct_window]
    return level - width / 2, level + width / 2
  return t.lo, t.hi


def save_volume_figure(real: np.ndarray, generated: np.ndarray, info: DatasetInfo,
                       path: str, *, channel: int = 0, title: str = "",
                       ct_window: str = "mediastinum") -> None:
  """Writes a PNG: real volumes' rows, then generated volumes' rows.

  Args:
    real, generated: `[N, D, H, W, C]` in model range [-1, 1] (N may differ).
    info: physical units of the channels.
    path: output PNG.
    channel: channel shown.
    title: figure title.
    ct_window: CT display window name (see `viz.CT_WINDOWS`).
  """
  real, generated = np.asarray(real, np.float32), np.asarray(generated, np.float32)
  for name, x in (("real", real), ("generated", generated)):
    if x.ndim != 5:
      raise ValueError(f"{name} must be [N, D, H, W, C], got {x.shape}")
    if not 0 <= channel < x.shape[-1]:
      raise ValueError(f"channel {channel} out of range for {name} {x.shape}")
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  lo, hi = _display_range(info, channel, ct_window)
  t = info.intensity[channel]
  rows = [("real", v) for v in real] + [("generated", v) for v in generated]
  d, h, w = real.shape[1:4]
  # Physical aspect: voxel spacing along depth vs in-plane.
  spacing = tuple(info.spacing_mm) or (1.0, 1.0, 1.0)
  aspect = {"axial": spacing[1] / spacing[2] if len(spacing) == 3 else 1.0}
  if len(spacing) == 3:
    aspect.update(coronal=spacing[0] / spacing[2], sagittal=spacing[0] / spacing[1],
                  mip=spacing[0] / spacing[2])
  fig, axes = plt.subplots(len(rows), len(VIEWS),
                           figsize=(2.0 * len(VIEWS), 2.0 * len(rows) * max(d / h, 0.5)),
                           squeeze=False)
  for r, (label, vol) in enumerate(rows):
    views = orthogonal_views(t.to_physical(vol[..., channel]))
    for c, view in enumerate(VIEWS):
      ax = axes[r, c]
      shown = np.clip((views[view] - lo) / (hi - lo), 0.0, 1.0)
      ax.imshow(shown, cmap="gray" if t.modality == "ct" else "hot", vmin=0, vmax=1,
                aspect=aspect.get(view, 1.0), interpolation="nearest",
                origin="upper")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(view, fontsize=8)
      if c == 0:
        ax.set_ylabel(label, fontsize=8)
  fig.suptitle(title or f"{t.modality} ({t.unit}, display {lo:g}..{hi:g})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
