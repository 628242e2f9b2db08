"""Physical realism: per-tissue HU distribution distances, body masks.

Tissue classes are fixed CT Hounsfield-unit ranges, half-open `[lo, hi)`:

  air_lung     (-inf, -500)   air and aerated lung
  fat          [-200, -50)
  soft_tissue  [-50, 150)     muscle, organs, blood, non-calcified lesions
  bone         [300, inf)     cortical/trabecular bone, calcification

Values in the gaps (-500..-200 partial-volume lung, 150..300 enhanced or
cancellous bone) belong to no class but do count in the overall distance.

The classes are defined by the REAL image's HU values:
- paired (translation, same anatomy): a voxel's class is read from the real
  image and the real and generated values of the same voxels are compared;
- unpaired (generation): there is no voxel correspondence, so the generated
  values are classed by the same HU ranges applied to the generated image.
  Within-class distances then measure the shape of each tissue's histogram,
  and `hu_fraction_diff_<class>` reports how much more (or less) of each tissue
  the generator produces.

The distance is the 1-Wasserstein distance between the empirical HU
distributions (`scipy.stats.wasserstein_distance`, exact), in HU.
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage
import scipy.stats

TISSUE_CLASSES: dict[str, tuple[float, float]] = {
    "air_lung": (-np.inf, -500.0),
    "fat": (-200.0, -50.0),
    "soft_tissue": (-50.0, 150.0),
    "bone": (300.0, np.inf),
}


def tissue_masks(hu) -> dict[str, np.ndarray]:
  """Boolean masks (same shape as `hu`) of each class in `TISSUE_CLASSES`."""
  hu = np.asarray(hu)
  return {name: (hu >= lo) & (hu < hi) for name, (lo, hi) in TISSUE_CLASSES.items()}


def body_mask(hu, *, threshold: float = -500.0) -> np.ndarray:
  """The patient's body in one CT image, `[*spatial]` bool.

  Voxels above `threshold` HU, largest connected component (drops the table
  and noise), holes filled slice by slice along the first axis for 3D (lungs
  and airways touch the top/bottom of a volume, so a 3D fill would leave them
  out).

  Args:
    hu: `[H, W]` or `[D, H, W]` image in HU (no channel axis).
    threshold: tissue/air boundary in HU.
  """
  hu = np.asarray(hu)
  if hu.ndim not in (2, 3):
    raise ValueError(f"body_mask expects [H, W] or [D, H, W], got {hu.shape}")
  tissue = hu > threshold
  labels, n = scipy.ndimage.label(tissue)
  if n == 0:
    return np.zeros(hu.shape, bool)
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  body = labels == np.argmax(sizes)
  if hu.ndim == 2:
    return scipy.ndimage.binary_fill_holes(body)
  return np.stack([scipy.ndimage.binary_fill_holes(s) for s in body])


def _subsample(values: np.ndarray, max_values: int,
               rng: np.random.Generator) -> np.ndarray:
  if values.size > max_values:
    return rng.choice(values, max_values, replace=False)
  return values


def wasserstein1(a, b) -> float:
  """Exact 1-Wasserstein distance between the empirical distributions of `a`, `b`."""
  a, b = np.ravel(a), np.ravel(b)
  if a.size == 0 or b.size == 0:
    raise ValueError(f"wasserstein1 needs non-empty samples, got sizes "
                     f"{a.size} and {b.size}")
  return float(scipy.stats.wasserstein_distance(a, b))


def hu_distribution_distances(real_hu, generated_hu, *, paired: bool,
                              real_mask=None, generated_mask=None,
                              max_values: int = 2_000_000,
                              seed: int = 0) -> dict[str, float]:
  """Overall and per-tissue W1 between real and generated HU values.

  Args:
    real_hu: `[N, *spatial]` or `[N, *spatial, 1]` real images in HU.
    generated_hu: generated images in HU; same shape as `real_hu` when
      `paired`, any number of images of the same layout otherwise.
    paired: keyword-only; True when `generated_hu[i]` depicts the same anatomy
      as `real_hu[i]` voxel for voxel (classes read from the real image).
    real_mask: optional bool, `real_hu`'s shape without channel: only voxels
      inside count (e.g. `body_mask`, so outside air does not dominate).
    generated_mask: the same for `generated_hu` (unpaired only; paired uses
      `real_mask` for both).
    max_values: per-distribution cap; larger samples are subsampled (seeded).
    seed: numpy seed for subsampling.

  Returns:
    {'hu_w1': overall, 'hu_w1_<class>': per class (NaN when either side has
     no voxel of the class), 'hu_fraction_diff_<class>': generated minus real
     fraction of voxels in the class (unpaired only)}.
  """
  real = _squeeze_channel("real_hu", real_hu)
  gen = _squeeze_channel("generated_hu", generated_hu)
  if real.shape[1:] != gen.shape[1:] or (paired and real.shape != gen.shape):
    why = " (paired needs identical shapes)" if paired else ""
    raise ValueError(f"real_hu {real.shape} and generated_hu {gen.shape} "
                     f"differ in shape{why}")
  rmask = _mask("real_mask", real_mask, real.shape)
  gmask = rmask if paired else _mask("generated_mask", generated_mask, gen.shape)
  rng = np.random.default_rng(seed)
  out = {"hu_w1": wasserstein1(_subsample(real[rmask], max_values, rng),
                               _subsample(gen[gmask], max_values, rng))}
  real_classes = tissue_masks(real)
  gen_classes = real_classes if paired else tissue_masks(gen)
  for name in TISSUE_CLASSES:
    r_sel, g_sel = real_classes[name] & rmask, gen_classes[name] & gmask
    r_vals, g_vals = real[r_sel], gen[g_sel]
    out[f"hu_w1_{name}"] = (
        wasserstein1(_subsample(r_vals, max_values, rng),
                     _subsample(g_vals, max_values, rng))
        if r_vals.size and g_vals.size else float("nan"))
    if not paired:
      out[f"hu_fraction_diff_{name}"] = float(
          g_sel.sum() / max(gmask.sum(), 1) - r_sel.sum() / max(rmask.sum(), 1))
  return out


FOREGROUND_MODEL_LEVEL = -0.8  # 10 % of the intensity window, the builder's foreground rule


def intensity_distance(real_model, generated_model, transform, *, max_values: int = 2_000_000,
                       seed: int = 0) -> dict[str, float]:
  """Intensity realism of one non-CT channel, in the units of its intensity policy.

  Both sides are mapped back with the channel's `IntensityTransform` (SUV for
  PET, percentile-normalised [0, 1] for MRI, raw units) and compared over
  their foreground voxels: those above 10 % of the window (model range
  > -0.8, the `medical_folder` builder's foreground rule), so the background
  that fills most of a scan does not decide the distance.

  Args:
    real_model, generated_model: `[N, *spatial]` one channel in [-1, 1].
    transform: its `DatasetInfo.intensity` entry.

  Returns:
    {'intensity_w1': W1 over foreground voxels in the policy's units (NaN
     when a side has none), 'intensity_foreground_diff': generated minus real
     foreground fraction}.
  """
  real, gen = np.asarray(real_model, np.float32), np.asarray(generated_model, np.float32)
  rmask, gmask = real > FOREGROUND_MODEL_LEVEL, gen > FOREGROUND_MODEL_LEVEL
  rng = np.random.default_rng(seed)
  w1 = (wasserstein1(_subsample(transform.to_physical(real[rmask]), max_values, rng),
                     _subsample(transform.to_physical(gen[gmask]), max_values, rng))
        if rmask.any() and gmask.any() else float("nan"))
  return {"intensity_w1": w1,
          "intensity_foreground_diff": float(gmask.mean() - rmask.mean())}


def _squeeze_channel(name: str, x) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim >= 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim not in (3, 4):
    raise ValueError(f"{name} must be [N, H, W(, 1)] or [N, D, H, W(, 1)] "
                     f"single-channel HU, got shape {x.shape}")
  return x


def _mask(name: str, mask, shape) -> np.ndarray:
  if mask is None:
    return np.ones(shape, bool)
  mask = np.asarray(mask, bool)
  if mask.shape != tuple(shape):
    raise ValueError(f"{name} shape {mask.shape} != image shape {tuple(shape)}")
  return mask
