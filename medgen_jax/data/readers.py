"""Reading one image source (NIfTI, DICOM series, PNG, NPY) into [Z, H, W].

Only pixel data and geometry are read. No DICOM header field other than
geometry and rescale (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, RescaleSlope/Intercept, Rows/Columns) is ever looked at, so no
patient identifier can travel further than this module.

Orientation convention of the returned arrays (radiological display): axis 0
inferior -> superior, rows anterior -> posterior, columns patient right ->
left.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Sequence

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + (".npy", ".png", ".dcm")


class BadFileError(ValueError):
  """An input file that cannot be read (corrupt, truncated, unsupported)."""

  def __init__(self, path: str, problem: str, detail: str = ""):
    super().__init__(f"{path}: {problem}" + (f" ({detail})" if detail else ""))
    self.path = path
    self.problem = problem  # never contains the path: safe for summaries.


@dataclasses.dataclass
class Volume:
  """Pixel data in physical units.

  Attributes:
    array: float32 [Z, H, W] (Z = 1 for 2D images).
    spacing_mm: (z, row, column) spacing; 1.0 where unknown.
    is_2d: the source was a single 2D image (PNG, 2D NPY, one DICOM file).
    affine: 4x4 map from array index `(z, row, column, 1)` to scanner RAS
      millimetres (NIfTI: its affine; DICOM: ImagePositionPatient and
      ImageOrientationPatient), or None where the source has no geometry
      (PNG, NPY).
  """
  array: np.ndarray
  spacing_mm: tuple[float, float, float]
  is_2d: bool = False
  affine: np.ndarray | None = None


def opaque_id(name: str, salt: str) -> str:
  """16-hex-digit salted SHA-256 of a subject name: stable, not reversible
  without the salt (short hospital ids can be brute-forced from an unsalted
  hash, so real data should use a private salt)."""
  return hashlib.sha256(f"{salt}\0{name}".encode()).hexdigest()[:16]


def image_suffix(path: str) -> str:
  """'.nii.gz', '.nii', '.npy', '.png', '.dcm' or '' (no/unknown suffix)."""
  lower = path.lower()
  for suffix in IMAGE_SUFFIXES:
    if lower.endswith(suffix):
      return suffix
  return ""


def read_nifti(path: str) -> Volume:
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  try:
    img = nib.as_closest_canonical(nib.load(path))  # RAS+
    data = np.asarray(img.dataobj, dtype=np.float32)
  except Exception as e:  # nibabel raises many types for broken files.
    raise BadFileError(path, "not a readable NIfTI file",
                       f"{type(e).__name__}: {e}") from None
  zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim == 2:
    data = data[:, :, None]
    zooms = zooms[:2] + (1.0,)
  if data.ndim != 3:
    raise BadFileError(path, f"expected a 2D or 3D image, got shape {data.shape}")
  # RAS (x, y, z) -> [z, rows anterior->posterior, columns right->left]:
  # vol[z, r, c] = data[X - 1 - c, Y - 1 - r, z].
  vol = np.transpose(data, (2, 1, 0))[:, ::-1, ::-1]
  nx, ny = data.shape[:2]
  index = np.array([[0, 0, -1, nx - 1], [0, -1, 0, ny - 1], [1, 0, 0, 0], [0, 0, 0, 1]],
                   np.float64)
  return Volume(np.ascontiguousarray(vol), (zooms[2], zooms[1], zooms[0]),
                is_2d=data.shape[2] == 1, affine=np.asarray(img.affine, np.float64) @ index)


def read_dicom_series(paths: Sequence[str]) -> Volume:
  """Slices sorted along the slice normal, RescaleSlope/Intercept applied."""
  import pydicom  # pylint: disable=g-import-not-at-top
  slices = []
  for path in paths:
    try:
      ds = pydicom.dcmread(path)
      pixels = ds.pixel_array.astype(np.float32)
    except Exception as e:  # truncated files raise from pydicom or numpy.
      raise BadFileError(path, "not a readable DICOM image",
                         f"{type(e).__name__}: {e}") from None
    if pixels.ndim != 2:
      raise BadFileError(path, f"expected one 2D slice per file, got {pixels.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    orient = np.asarray(getattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]),
                        np.float64)
    position = np.asarray(getattr(ds, "ImagePositionPatient", [0, 0, len(slices)]),
                          np.float64)
    normal = np.cross(orient[:3], orient[3:])
    spacing = [float(s) for s in getattr(ds, "PixelSpacing", [1.0, 1.0])]
    slices.append((float(position @ normal), pixels * slope + intercept, spacing, path,
                   position, orient))
  shapes = {s[1].shape for s in slices}
  if len(shapes) > 1:
    raise ValueError(f"{os.path.dirname(paths[0])}: DICOM series mixes slice "
                     f"shapes {sorted(shapes)}; cannot stack it into a volume")
  slices.sort(key=lambda s: s[0])
  positions = np.array([s[0] for s in slices])
  if len(slices) > 1:
    steps = np.diff(positions)
    if np.any(steps <= 0):
      raise ValueError(f"{os.path.dirname(paths[0])}: DICOM series has duplicate "
                       "slice positions (two series mixed in one folder?)")
    dz = float(np.median(steps))
  else:
    dz = 1.0
  vol = np.stack([s[1] for s in slices])
  row, col = slices[0][2]
  # DICOM patient coordinates are LPS; pixel (r, c) of a slice lies at
  # position + c * col_spacing * orient[:3] + r * row_spacing * orient[3:].
  first, orient = slices[0][4], slices[0][5]
  z_step = ((slices[-1][4] - first) / (len(slices) - 1) if len(slices) > 1
            else np.cross(orient[:3], orient[3:]))
  lps = np.eye(4)
  lps[:3, 0], lps[:3, 1], lps[:3, 2] = z_step, orient[3:] * row, orient[:3] * col
  lps[:3, 3] = first
  return Volume(vol, (dz, row, col), is_2d=len(slices) == 1,
                affine=np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)


def read_png(path: str) -> Volume:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode not in ("L", "I", "I;16", "F"):
        img = img.convert("L")
      arr = np.asarray(img, np.float32)
  except Exception as e:
    raise BadFileError(path, "not a readable PNG", f"{type(e).__name__}: {e}") from None
  return Volume(arr[None], (1.0, 1.0, 1.0), is_2d=True)


def read_npy(path: str) -> Volume:
  try:
    arr = np.load(path, allow_pickle=False)
  except Exception as e:
    raise BadFileError(path, "not a readable .npy array",
                       f"{type(e).__name__}: {e}") from None
  if arr.ndim not in (2, 3) or not np.issubdtype(arr.dtype, np.number):
    raise BadFileError(path, f"expected a numeric [H, W] or [Z, H, W] array, got "
                       f"{arr.dtype} {arr.shape}")
  arr = arr.astype(np.float32)
  return Volume(arr[None] if arr.ndim == 2 else arr, (1.0, 1.0, 1.0),
                is_2d=arr.ndim == 2)


def read_source(paths: Sequence[str]) -> Volume:
  """One image source: a single file, or the files of one DICOM series."""
  if len(paths) == 1 and os.path.isfile(paths[0]):
    suffix = image_suffix(paths[0])
    if suffix in NIFTI_SUFFIXES:
      return read_nifti(paths[0])
    if suffix == ".npy":
      return read_npy(paths[0])
    if suffix == ".png":
      return read_png(paths[0])
  return read_dicom_series(paths)
