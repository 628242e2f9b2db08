"""Condition fidelity: do generated images show what was asked for?

Two independent judges:
- the domain classifier (`medgen_jax.classifier.predict_conditions`)
  applied to generated images, scored against the requested conditions
  (`condition_fidelity`): accuracy per categorical field (e.g.
  `lesion_accuracy`, `site_accuracy`), MAE per continuous field (`age_mae`, in
  physical units). A generator that ignores its conditions scores chance
  (1 / num_classes for uniformly requested classes), reported beside it;
- a thresholding rule on the image itself for lesion size in CT
  (`lesion_diameter_from_image`), which needs no trained model.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import scipy.ndimage

from medgen_jax.data.info import CATEGORICAL, ConditionField
from medgen_jax.metrics import physical


def condition_fidelity(predicted: Mapping[str, np.ndarray],
                       requested: Mapping[str, np.ndarray],
                       fields: Sequence[ConditionField]) -> dict[str, float]:
  """Scores predictions on generated images against the requested conditions.

  Args:
    predicted: {field name: `[N]`} classifier outputs on generated images:
      int class indices for categorical fields, physical values for continuous.
    requested: {field name: `[N]`} the conditions the images were generated
      with; categorical -1 / continuous NaN (unknown) entries are skipped.
    fields: the dataset's condition fields (`DatasetInfo.conditions`).

  Returns:
    per categorical field '<name>_accuracy' and '<name>_chance', the expected
    accuracy of a condition-blind generator with the same marginals (sum over
    classes of requested frequency x predicted frequency), and per class
    '<name>_accuracy_<class name>', the accuracy among the images requested
    as that class (does a large lesion appear when one is asked for?) and
    the confusion row '<name>_as_<predicted>_given_<requested>' (fraction of
    the images requested as one class that are classified as another); per
    continuous field '<name>_mae'. NaN when no entry is known.
  """
  out = {}
  for field in fields:
    for name, d in (("predicted", predicted), ("requested", requested)):
      if field.name not in d:
        raise ValueError(f"{name} lacks condition {field.name!r}; has "
                         f"{sorted(d)}")
    pred = np.asarray(predicted[field.name]).reshape(-1)
    req = np.asarray(requested[field.name]).reshape(-1)
    if pred.shape != req.shape:
      raise ValueError(f"condition {field.name!r}: {pred.shape[0]} predictions "
                       f"for {req.shape[0]} requested values")
    if field.kind == CATEGORICAL:
      known = req >= 0
      p, r = pred[known].astype(np.int64), req[known].astype(np.int64)
      out[f"{field.name}_accuracy"] = (float(np.mean(p == r)) if known.any()
                                       else float("nan"))
      # Expected accuracy if predictions were independent of the request,
      # given the observed marginals: what "chance" means for this batch.
      k = field.num_classes
      pr = np.bincount(np.clip(p, 0, k - 1), minlength=k) / max(len(p), 1)
      rr = np.bincount(np.clip(r, 0, k - 1), minlength=k) / max(len(r), 1)
      out[f"{field.name}_chance"] = (float(pr @ rr) if known.any()
                                     else float("nan"))
      labels = list(field.class_names) or [str(c) for c in range(k)]
      for c in range(k):
        asked = r == c
        out[f"{field.name}_accuracy_{labels[c]}"] = (float(np.mean(p[asked] == c))
                                                     if asked.any() else float("nan"))
        # The confusion row: where the requests for class c went.
        for j in range(k):
          out[f"{field.name}_as_{labels[j]}_given_{labels[c]}"] = (
              float(np.mean(p[asked] == j)) if asked.any() else float("nan"))
    else:
      known = np.isfinite(req)
      out[f"{field.name}_mae"] = (
          float(np.mean(np.abs(pred[known].astype(np.float64) - req[known])))
          if known.any() else float("nan"))
  return out


def lung_region(ct_hu, *, body_threshold: float = -500.0,
                lung_threshold: float = -500.0) -> np.ndarray:
  """Lung mask with holes filled, so nodules inside the lungs are included.

  Lungs = voxels below `lung_threshold` HU inside the body (`physical.body_mask`,
  itself filled), then holes filled (slice-wise along the first axis in 3D).

  Args:
    ct_hu: `[H, W]` or `[D, H, W]` CT in HU.
  Returns:
    bool mask, same shape.
  """
  ct_hu = np.asarray(ct_hu, np.float32)
  body = physical.body_mask(ct_hu, threshold=body_threshold)
  lungs = body & (ct_hu < lung_threshold)
  if ct_hu.ndim == 2:
    return scipy.ndimage.binary_fill_holes(lungs)
  return np.stack([scipy.ndimage.binary_fill_holes(s) for s in lungs])


def lesion_diameter_from_image(ct_hu, lung_mask=None, *,
                               spacing_mm: Sequence[float],
                               lesion_threshold: float = -300.0) -> float:
  """Equivalent diameter (mm) of the largest lung nodule, by thresholding.

  The rule: inside the lung region (`lung_mask`, or `lung_region(ct_hu)` when
  None), voxels above `lesion_threshold` HU are nodule candidates; the largest
  6-/4-connected component is the lesion and its equivalent diameter is that
  of the disk (2D: d = 2 sqrt(A / pi)) or sphere (3D: d = (6 V / pi)^(1/3))
  of the same area / volume in physical units. Vessels above the threshold
  inside the lung count as candidates, and juxtapleural nodules (touching the
  chest wall) are missed: the rule is meant for phantoms and as a size check.

  Args:
    ct_hu: `[H, W]` or `[D, H, W]` (optionally with a trailing channel of 1) in HU.
    lung_mask: optional bool mask of the lung region, same spatial shape.
    spacing_mm: voxel size per spatial axis (len 2 or 3).
    lesion_threshold: nodule/lung boundary in HU.

  Returns:
    diameter in mm; 0.0 when there is no candidate voxel.
  """
  ct_hu = np.asarray(ct_hu, np.float32)
  if ct_hu.ndim in (3, 4) and ct_hu.shape[-1] == 1:
    ct_hu = ct_hu[..., 0]
  if ct_hu.ndim not in (2, 3):
    raise ValueError(f"ct_hu must be [H, W] or [D, H, W] (optional channel 1), "
                     f"got shape {ct_hu.shape}")
  spacing = tuple(float(s) for s in spacing_mm)
  if len(spacing) != ct_hu.ndim or min(spacing) <= 0:
    raise ValueError(f"spacing_mm needs {ct_hu.ndim} positive values, got "
                     f"{spacing_mm}")
  if lung_mask is None:
    region = lung_region(ct_hu)
  else:
    region = np.asarray(lung_mask, bool)
    if region.shape != ct_hu.shape:
      raise ValueError(f"lung_mask shape {region.shape} != image {ct_hu.shape}")
  labels, n = scipy.ndimage.label(region & (ct_hu > lesion_threshold))
  if n == 0:
    return 0.0
  sizes = np.bincount(labels.ravel())[1:]
  measure = float(sizes.max()) * float(np.prod(spacing))
  if ct_hu.ndim == 2:
    return float(2.0 * np.sqrt(measure / np.pi))
  return float((6.0 * measure / np.pi) ** (1.0 / 3.0))


def lesion_diameter_error(images_hu, requested_diameter_mm, *,
                          spacing_mm: Sequence[float],
                          lesion_threshold: float = -300.0) -> dict[str, object]:
  """Measured vs requested lesion diameter over a batch of CT images.

  Args:
    images_hu: `[N, H, W(, 1)]` or `[N, D, H, W(, 1)]` in HU.
    requested_diameter_mm: `[N]` requested diameters (0 = no lesion; NaN =
      unknown, skipped).
    spacing_mm: voxel size per spatial axis.

  Returns:
    {'lesion_diameter_mae': mean |measured - requested| in mm over known
     entries, 'measured_mm': `[N]` measured diameters}.
  """
  images = np.asarray(images_hu, np.float32)
  req = np.asarray(requested_diameter_mm, np.float64).reshape(-1)
  if images.shape[0] != req.shape[0]:
    raise ValueError(f"{images.shape[0]} images for {req.shape[0]} requested "
                     f"diameters")
  measured = np.asarray([
      lesion_diameter_from_image(img, spacing_mm=spacing_mm,
                                 lesion_threshold=lesion_threshold)
      for img in images])
  known = np.isfinite(req)
  mae = (float(np.mean(np.abs(measured[known] - req[known]))) if known.any()
         else float("nan"))
  return {"lesion_diameter_mae": mae, "measured_mm": measured}
