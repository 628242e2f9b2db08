"""Writing generated images as NIfTI (`.nii.gz`) with their voxel spacing.

Voxel axes follow the array axes (`[H, W]` or `[D, H, W]`), and the affine is
`diag(spacing_mm, 1)`: voxel (i, j, k) sits at (i * s0, j * s1, k * s2) mm.
That is exact about sizes and distances (what measurements need) and makes no
claim about patient orientation, which a synthetic image does not have.
"""
from __future__ import annotations

import os
from typing import Sequence

import nibabel as nib
import numpy as np


def spacing_affine(spacing_mm: Sequence[float]) -> np.ndarray:
  """4x4 affine scaling voxel indices by `spacing_mm` (2 or 3 entries)."""
  spacing = [float(s) for s in spacing_mm]
  if len(spacing) not in (2, 3) or any(s <= 0 for s in spacing):
    raise ValueError(f"spacing_mm must have 2 or 3 positive entries, got {spacing_mm}")
  return np.diag(spacing + [1.0] * (4 - len(spacing)))


def save_nifti(path: str, image: np.ndarray, spacing_mm: Sequence[float], *,
               unit: str = "") -> str:
  """Writes one image in physical units.

  Args:
    path: output file, ending in `.nii.gz` or `.nii`.
    image: float `[*spatial]` or `[*spatial, C]` (C > 1 stored as the 4th
      NIfTI dimension), spatial 2D or 3D, already in physical units (HU, SUV).
    spacing_mm: one spacing per spatial axis.
    unit: intensity unit written to the header's description (e.g. 'HU').

  Returns:
    the path written.
  """
  image = np.asarray(image, np.float32)
  spacing = tuple(float(s) for s in spacing_mm)
  nd = len(spacing)
  if image.ndim == nd + 1 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == nd + 1 and nd == 2:
    # NIfTI's 4th axis is time/channels: keep a singleton 3rd spatial axis.
    image = image[:, :, None, :]
  if image.ndim not in (nd, nd + 1, 4):
    raise ValueError(f"image of shape {image.shape} does not match spacing "
                     f"{spacing} ({nd} spatial axes)")
  if not path.endswith((".nii", ".nii.gz")):
    raise ValueError(f"NIfTI path must end in .nii or .nii.gz, got {path!r}")
  img = nib.Nifti1Image(image, spacing_affine(spacing))
  zooms = spacing + (1.0,) * (image.ndim - nd)
  img.header.set_zooms(zooms)
  img.header.set_xyzt_units(xyz="mm")
  if unit:
    img.header["descrip"] = f"synthetic; unit={unit}"[:79].encode()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  nib.save(img, path)
  return path
