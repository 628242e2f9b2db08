"""Writing generated images as NIfTI (`.nii.gz`) in the training data's geometry.

Voxel axes follow the array axes (`[H, W]` or `[D, H, W]`). With the
dataset's affine (`DatasetInfo.extra['affine']`, recorded by `medical_folder`
from the scanner's NIfTI affine or DICOM position and orientation) a sample
opens in a viewer aligned with the real scans: in 3D the affine maps
`(d, h, w)` to RAS mm, in 2D `(h, w, 0)` onto the middle slice of the
reference scan. Without one (the phantom, PNG/NPY folders) the affine is
`diag(spacing_mm, 1)`: exact about sizes and distances, no claim about
patient orientation.
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


def check_affine(affine, spacing_mm: Sequence[float]) -> np.ndarray:
  """`affine` as a 4x4 float array whose first columns' lengths are `spacing_mm`.

  Raises:
    ValueError: not 4x4, singular, or a voxel size that disagrees with the
      spacing (an affine of another dataset).
  """
  a = np.asarray(affine, np.float64)
  if a.shape != (4, 4) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
    raise ValueError(f"affine must be an invertible 4x4 matrix, got {a.tolist()}")
  spacing = np.asarray([float(s) for s in spacing_mm])
  lengths = np.linalg.norm(a[:3, :len(spacing)], axis=0)
  if not np.allclose(lengths, spacing, rtol=1e-3):
    raise ValueError(f"affine voxel sizes {lengths.round(4).tolist()} disagree with "
                     f"spacing_mm {spacing.tolist()}")
  return a


def save_nifti(path: str, image: np.ndarray, spacing_mm: Sequence[float], *,
               unit: str = "", affine=None) -> str:
  """Writes one image in physical units.

  Args:
    path: output file, ending in `.nii.gz` or `.nii`.
    image: float `[*spatial]` or `[*spatial, C]` (C > 1 stored as the 4th
      NIfTI dimension), spatial 2D or 3D, already in physical units (HU, SUV).
    spacing_mm: one spacing per spatial axis.
    unit: intensity unit written to the header's description (e.g. 'HU').
    affine: optional 4x4 voxel-index -> RAS mm map (`check_affine`); None
      writes `spacing_affine(spacing_mm)`.

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
  matrix = spacing_affine(spacing) if affine is None else check_affine(affine, spacing)
  img = nib.Nifti1Image(image, matrix)
  if affine is not None:  # scanner coordinates: qform and sform both say so
    img.set_qform(matrix, code="scanner")
    img.set_sform(matrix, code="scanner")
  zooms = spacing + (1.0,) * (image.ndim - nd)
  img.header.set_zooms(zooms)
  img.header.set_xyzt_units(xyz="mm")
  if unit:
    img.header["descrip"] = f"synthetic; unit={unit}"[:79].encode()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  nib.save(img, path)
  return path
