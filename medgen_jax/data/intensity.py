"""Intensity policies: which physical range of each channel maps onto [-1, 1].

Policies (per modality, chosen by name in `POLICIES`):
  * 'ct_window': values stay in HU; the model sees the window [lo, hi] HU.
  * 'suv': values stay in SUV; the model sees [0, pet_max_suv].
  * 'percentile': each volume is rescaled so its (p_lo, p_hi) percentiles of
    the foreground become 0 and 1 (MRI has no absolute units); the model sees
    [0, 1]. Applied once at build time, so the stored values are normalised.
  * 'raw': stored as read, the model sees [lo, hi] given in the config
    (8-bit PNG: [0, 255]).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from medgen_jax.data.info import IntensityTransform

POLICIES = ("ct_window", "suv", "percentile", "raw")


def default_policy(modality: str) -> str:
  """'ct' -> ct_window, 'pet' -> suv, anything else (MRI) -> percentile."""
  return {"ct": "ct_window", "pet": "suv"}.get(modality.lower(), "percentile")


def transform_for(modality: str, policy: str, *,
                  ct_window: Sequence[float] = (-1000.0, 1000.0),
                  pet_max_suv: float = 10.0,
                  raw_range: Sequence[float] = (0.0, 255.0)) -> IntensityTransform:
  """The IntensityTransform the pipeline applies for `policy`."""
  if policy == "ct_window":
    lo, hi = float(ct_window[0]), float(ct_window[1])
    return IntensityTransform(modality, "HU", lo, hi,
                              f"CT window [{lo:g}, {hi:g}] HU")
  if policy == "suv":
    return IntensityTransform(modality, "SUV", 0.0, float(pet_max_suv),
                              f"PET SUV clipped to [0, {pet_max_suv:g}]")
  if policy == "percentile":
    return IntensityTransform(modality, "normalised", 0.0, 1.0,
                              "per-volume foreground percentiles -> [0, 1]")
  if policy == "raw":
    lo, hi = float(raw_range[0]), float(raw_range[1])
    return IntensityTransform(modality, "raw", lo, hi, f"raw values [{lo:g}, {hi:g}]")
  raise ValueError(f"unknown intensity policy {policy!r}; expected one of {POLICIES}")


def percentile_normalise(volume: np.ndarray, percentiles: Sequence[float] = (1.0, 99.0)
                         ) -> np.ndarray:
  """Maps the foreground's percentiles onto [0, 1] (float32, not clipped).

  Foreground = voxels above the volume minimum (MRI background is ~0); when
  there is none, the whole volume is used.
  """
  volume = np.asarray(volume, np.float32)
  fg = volume[volume > volume.min()]
  if fg.size == 0:
    fg = volume.reshape(-1)
  lo, hi = np.percentile(fg, percentiles)
  if hi <= lo:
    return np.zeros_like(volume)
  return (volume - lo) / (hi - lo)
