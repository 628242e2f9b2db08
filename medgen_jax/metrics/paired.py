"""Paired (translation) metrics: PSNR, SSIM, MAE in physical units.

PSNR and SSIM are computed by dm-pix on images rescaled from physical units to
[0, 1] by a stated `data_range = (lo, hi)` (e.g. the dataset's CT window
(-1000, 1000) HU): `x01 = clip((x - lo) / (hi - lo), 0, 1)`, `max_val = 1`.
The numbers therefore depend on the data range, which must be reported with
them. MAE is in physical units (HU, SUV) and is not rescaled.

3D volumes `[N, D, H, W, C]` are evaluated slice-wise on the three planes,
axial (slices along D), coronal (along H) and sagittal (along W); each plane's
value is the mean over all slices of all volumes, and the headline value is
the mean of the three planes. 2D images `[N, H, W, C]` give one value per
image, averaged. Slices where real and generated are identical (PSNR = inf,
e.g. empty background slices) are left out of the PSNR mean; if all are, the
PSNR is inf.
"""
from __future__ import annotations

import functools

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

PLANES = ("axial", "coronal", "sagittal")


def _to_unit(x: np.ndarray, data_range: tuple[float, float]) -> np.ndarray:
  lo, hi = data_range
  return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _planes(x: np.ndarray) -> dict[str, np.ndarray]:
  """`[N, D, H, W, C]` -> {plane: `[N * slices, rows, cols, C]`}."""
  n, d, h, w, c = x.shape
  return {
      "axial": x.reshape(n * d, h, w, c),
      "coronal": x.transpose(0, 2, 1, 3, 4).reshape(n * h, d, w, c),
      "sagittal": x.transpose(0, 3, 1, 2, 4).reshape(n * w, d, h, c),
  }


@functools.partial(jax.jit, static_argnames=("filter_size",))
def _pix_metrics(a, b, filter_size):
  # One compiled program per shape: eager dm-pix dispatches op by op.
  return pix.psnr(a, b), pix.ssim(a, b, max_val=1.0, filter_size=filter_size)


def _psnr_ssim_2d(real01: np.ndarray, gen01: np.ndarray, filter_size: int):
  psnr, ssim = (np.asarray(v) for v in _pix_metrics(
      jnp.asarray(real01), jnp.asarray(gen01), filter_size))
  finite = psnr[np.isfinite(psnr)]
  return (float(finite.mean()) if finite.size else float("inf"),
          float(ssim.mean()))


def masked_mae(real, generated, mask=None) -> float:
  """Mean |real - generated| over voxels where `mask` is True, all channels.

  Args:
    real, generated: `[N, *spatial, C]` in physical units.
    mask: `[N, *spatial]` bool or None (all voxels).

  Returns:
    MAE in physical units; NaN when the mask is empty.
  """
  real = np.asarray(real, np.float32)
  generated = np.asarray(generated, np.float32)
  if real.shape != generated.shape:
    raise ValueError(f"real {real.shape} and generated {generated.shape} differ")
  err = np.abs(real - generated).mean(axis=-1)
  if mask is None:
    return float(err.mean())
  mask = np.asarray(mask, bool)
  if mask.shape != err.shape:
    raise ValueError(f"mask must be [N, *spatial] = {err.shape}, got {mask.shape}")
  return float(err[mask].mean()) if mask.any() else float("nan")


def paired_metrics(real, generated, *, data_range: tuple[float, float],
                   body_mask=None, lesion_mask=None,
                   filter_size: int = 11) -> dict[str, float]:
  """PSNR, SSIM and MAE of aligned generated images against real ones.

  Args:
    real: `[N, H, W, C]` or `[N, D, H, W, C]` in physical units.
    generated: same shape and units as `real`.
    data_range: (lo, hi) physical range mapped to [0, 1] for PSNR/SSIM.
    body_mask: `[N, *spatial]` bool for `mae_body` (e.g.
      `physical.body_mask` of the real image); None = all voxels.
    lesion_mask: `[N, *spatial]` bool/uint8 for `mae_lesion`; None = omitted.
    filter_size: SSIM Gaussian window (every slice side must be >= it).

  Returns:
    {'psnr', 'ssim', 'mae_body'[, 'mae_lesion']} and, for 3D, also
    'psnr_<plane>' and 'ssim_<plane>' for axial/coronal/sagittal.
  """
  real = np.asarray(real, np.float32)
  generated = np.asarray(generated, np.float32)
  if real.shape != generated.shape:
    raise ValueError(f"real {real.shape} and generated {generated.shape} differ")
  if real.ndim not in (4, 5):
    raise ValueError(f"images must be [N, H, W, C] or [N, D, H, W, C], got "
                     f"{real.shape}")
  lo, hi = data_range
  if not hi > lo:
    raise ValueError(f"data_range must be (lo, hi) with hi > lo, got {data_range}")
  if min(real.shape[1:-1]) < filter_size:
    raise ValueError(f"every spatial side must be >= SSIM filter_size "
                     f"{filter_size}, got spatial shape {real.shape[1:-1]}")
  r01, g01 = _to_unit(real, data_range), _to_unit(generated, data_range)
  out = {}
  if real.ndim == 4:
    out["psnr"], out["ssim"] = _psnr_ssim_2d(r01, g01, filter_size)
  else:
    rp, gp = _planes(r01), _planes(g01)
    for plane in PLANES:
      out[f"psnr_{plane}"], out[f"ssim_{plane}"] = _psnr_ssim_2d(
          rp[plane], gp[plane], filter_size)
    out["psnr"] = float(np.mean([out[f"psnr_{p}"] for p in PLANES]))
    out["ssim"] = float(np.mean([out[f"ssim_{p}"] for p in PLANES]))
  out["mae_body"] = masked_mae(real, generated, body_mask)
  if lesion_mask is not None:
    out["mae_lesion"] = masked_mae(real, generated, np.asarray(lesion_mask) > 0)
  return out
