"""Sample grids: one row per condition value, images shown in a CT window.

Model outputs in [-1, 1] are mapped back to physical units with the
DatasetInfo (HU for CT) and displayed in a clinical window, so a grid looks
like what a radiologist would see; 3D volumes show their middle axial slice and
multi-channel images (CT + PET) show channels side by side.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from medgen_jax.data.info import CATEGORICAL, DatasetInfo

# (level, width) in HU.
CT_WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0),
              "bone": (400.0, 1800.0)}


def row_condition(info: DatasetInfo) -> str | None:
  """The categorical field the rows vary ('lesion' if present), or None."""
  names = [f.name for f in info.conditions if f.kind == CATEGORICAL]
  if "lesion" in names:
    return "lesion"
  return names[0] if names else None


def grid_conditions(info: DatasetInfo, num_cols: int) -> tuple[dict[str, np.ndarray], list[str]]:
  """Conditions for a [rows * cols] sample batch and the row labels.

  Row r sets the row field to class r; every other field is 'unknown'
  (-1 categorical, NaN continuous), so the model uses its null embedding.

  Returns:
    (conditions dict name -> `[rows * num_cols]`, row labels).
  """
  name = row_condition(info)
  rows = info.condition(name).num_classes if name else 1
  labels = list(info.condition(name).class_names) if name else [""]
  labels += [str(i) for i in range(len(labels), rows)]
  out = {}
  for f in info.conditions:
    if f.name == name:
      out[f.name] = np.repeat(np.arange(rows, dtype=np.int32), num_cols)
    elif f.kind == CATEGORICAL:
      out[f.name] = np.full(rows * num_cols, -1, np.int32)
    else:
      out[f.name] = np.full(rows * num_cols, np.nan, np.float32)
  return out, [f"{name}={l}" if name else l for l in labels]


def to_display(images: np.ndarray, info: DatasetInfo, *, ct_window: str = "lung") -> np.ndarray:
  """Model-range images `[N, *spatial, C]` -> grey levels in [0, 1] `[N, H, C * W]`."""
  images = np.asarray(images, np.float32)
  if images.ndim == 5:  # volumes: middle axial slice
    images = images[:, images.shape[1] // 2]
  physical = info.to_physical(images)
  panels = []
  for c, t in enumerate(info.intensity):
    if t.modality == "ct" and ct_window in CT_WINDOWS:
      level, width = CT_WINDOWS[ct_window]
      lo, hi = level - width / 2, level + width / 2
    else:
      lo, hi = t.lo, t.hi
    panels.append(np.clip((physical[..., c] - lo) / (hi - lo), 0.0, 1.0))
  return np.concatenate(panels, axis=-1)


def save_grid(images: np.ndarray, info: DatasetInfo, path: str, *,
              row_labels: Sequence[str], title: str = "", ct_window: str = "lung") -> None:
  """Writes a PNG grid.

  Args:
    images: `[rows * cols, *spatial, C]` in [-1, 1], row-major.
    info: gives physical units and modalities.
    path: output PNG path.
    row_labels: one label per row (e.g. 'lesion=small').
    ct_window: a key of CT_WINDOWS for CT channels; other channels use their full range.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  shown = to_display(images, info, ct_window=ct_window)
  rows = len(row_labels)
  if shown.shape[0] % rows:
    raise ValueError(f"{shown.shape[0]} images do not fill {rows} rows")
  cols = shown.shape[0] // rows
  h, w = shown.shape[1:]
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2 * w / h + 1.0, rows * 1.2),
                           squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.imshow(shown[i], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if i % cols == 0:
      ax.set_ylabel(row_labels[i // cols], fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
