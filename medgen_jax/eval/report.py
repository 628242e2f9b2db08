"""Evaluation figures: sample grids per condition, closest pairs, HU histograms.

Written by `medgen_jax.eval.evaluate` next to `metrics.json`:
  samples_<field>.png     one row per class of a categorical condition, the
                          generated images that requested that class;
  memorization_<space>.png  the closest generated/training pairs (features,
                          pixels), from `memorization.save_closest_pairs_png`;
  hu_histograms.png       HU histograms inside the body, real train vs
                          generated vs real test, overall and per tissue;
  volumes.png             3D only: real and generated volumes' orthogonal
                          mid-slices and MIP (`viz_volume.save_volume_figure`).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
from matplotlib.figure import Figure  # Agg canvas, no pyplot state

from medgen_jax import viz, viz_volume
from medgen_jax.data.info import CATEGORICAL, DatasetInfo
from medgen_jax.metrics import memorization, physical


def save_condition_grid(path: str, images, requested: Mapping[str, np.ndarray],
                        info: DatasetInfo, field: str, *, cols: int) -> str | None:
  """A grid with one row per class of `field`, `cols` samples that asked for it.

  Classes nobody requested are left out; every row shows the same number of
  images (the smallest per-class count, at most `cols`).

  Args:
    path: output PNG.
    images: `[n, *spatial, C]` in [-1, 1].
    requested: {field: `[n]`} requested conditions.
    info: the DatasetInfo (units, class names).
    field: a categorical condition name.
    cols: samples per row at most.

  Returns:
    the path, or None when no class has a sample.
  """
  f = info.condition(field)
  if f.kind != CATEGORICAL:
    raise ValueError(f"condition {field!r} is not categorical")
  images = np.asarray(images)
  cls = np.asarray(requested[field])
  if cls.shape[0] != images.shape[0]:
    raise ValueError(f"{images.shape[0]} images for {cls.shape[0]} conditions")
  present = [c for c in range(f.num_classes) if np.any(cls == c)]
  if not present:
    return None
  per_row = min([cols] + [int(np.sum(cls == c)) for c in present])
  rows = [np.flatnonzero(cls == c)[:per_row] for c in present]
  names = list(f.class_names) or [str(c) for c in range(f.num_classes)]
  labels = [f"{field}={names[c]}" for c in present]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  viz.save_grid(images[np.concatenate(rows)], info, path, row_labels=labels,
                title=f"generated samples by requested {field}")
  return path


def save_hu_histograms(path: str, series: Mapping[str, tuple[np.ndarray, np.ndarray]],
                       *, bins: int = 100, hu_range=(-1024.0, 1500.0)) -> str:
  """Histograms (density, log scale) of HU values inside body masks.

  Args:
    path: output PNG.
    series: {label: (hu `[n, *spatial]`, body mask same shape)}.
    bins: histogram bins over `hu_range`.
    hu_range: (lo, hi) HU shown.

  Returns:
    the path.
  """
  if not series:
    raise ValueError("series is empty")
  panels = [("body", None)] + list(physical.TISSUE_CLASSES.items())
  fig = Figure(figsize=(3.2 * len(panels), 3.0))
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (name, bounds) in zip(axes, panels):
    for label, (hu, mask) in series.items():
      values = np.asarray(hu)[np.asarray(mask, bool)]
      if bounds is not None:
        lo, hi = bounds
        values = values[(values >= lo) & (values < hi)]
      if values.size:
        ax.hist(values, bins=bins, range=hu_range, density=True,
                histtype="step", label=label)
    ax.set_yscale("log")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("HU", fontsize=8)
  axes[0].legend(fontsize=7)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  return path


def write_figures(directory: str, *, generated, requested, train_images,
                  info: DatasetInfo, gen_artifacts: Mapping[str, Any],
                  ref_artifacts: Mapping[str, Any], real_train_hu,
                  real_train_body, num_pairs: int, grid_cols: int
                  ) -> dict[str, str]:
  """Writes every evaluation figure into `directory`; returns {name: path}."""
  out: dict[str, str] = {}
  for f in info.conditions:
    if f.kind == CATEGORICAL:
      p = save_condition_grid(os.path.join(directory, f"samples_{f.name}.png"),
                              generated, requested, info, f.name, cols=grid_cols)
      if p:
        out[f"samples_{f.name}"] = p
  for space, key, gen in (("features", "audit_features", generated),
                          ("pixels", "audit_pixels", generated)):
    out[f"memorization_{space}"] = memorization.save_closest_pairs_png(
        os.path.join(directory, f"memorization_{space}.png"), gen,
        train_images, gen_artifacts[key], num_pairs=num_pairs)
  if np.ndim(generated) == 5:
    # Volumes: orthogonal mid-slices and a maximum-intensity projection.
    os.makedirs(directory, exist_ok=True)
    out["volumes"] = os.path.join(directory, "volumes.png")
    shown = min(num_pairs, 3)
    viz_volume.save_volume_figure(
        np.asarray(train_images)[:shown], np.asarray(generated)[:shown], info,
        out["volumes"], title="real (top) vs generated: orthogonal slices and MIP")
  if real_train_hu is not None and "hu" in gen_artifacts:
    out["hu_histograms"] = save_hu_histograms(
        os.path.join(directory, "hu_histograms.png"),
        {"real train": (real_train_hu, real_train_body),
         "real test": (ref_artifacts["hu"], ref_artifacts["body"]),
         "generated": (gen_artifacts["hu"], gen_artifacts["body"])})
  return out
