"""Scoring one generated image set against the real splits.

`evaluate_images` computes every metric of a generated set and the same
metric of the real test split against the real train split (its
`*_real_reference`: what a generator that draws new patients from the data
distribution would get, at the reference's sample size). Tests call it with
real test images "as if generated" and must then get every metric equal to
its reference.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from medgen_jax import classifier
from medgen_jax.data import phantom
from medgen_jax.data.info import DatasetInfo
from medgen_jax.eval import report
from medgen_jax.metrics import bootstrap, distances, fidelity, manifold, memorization, physical
from medgen_jax.eval import settings as settings_lib


def phantom_lesion_ranges() -> dict[int, tuple[float, float]] | None:
  """Nominal diameter range (mm) per lesion class of the ct_phantom."""
  return {0: (0.0, 0.0), 1: phantom.SMALL_DIAMETER_MM, 2: phantom.LARGE_DIAMETER_MM}


def lesion_range_error(measured_mm, lesion_class,
                       ranges: Mapping[int, tuple[float, float]]) -> dict[str, float]:
  """How far measured diameters fall outside their class's nominal range.

  Args:
    measured_mm: `[N]` diameters from `fidelity.lesion_diameter_from_image`.
    lesion_class: `[N]` requested (or true) class; -1 entries are skipped.
    ranges: class -> (lo, hi) mm; class 0 'none' is (0, 0).

  Returns:
    {'lesion_diameter_error_mm': mean distance (mm) from the measured diameter
     to the requested class's range (0 inside it), 'lesion_size_in_range':
     fraction with distance 0}.
  """
  measured = np.asarray(measured_mm, np.float64).reshape(-1)
  cls = np.asarray(lesion_class).reshape(-1)
  if measured.shape != cls.shape:
    raise ValueError(f"{measured.shape[0]} diameters for {cls.shape[0]} classes")
  known = cls >= 0
  if not known.any():
    return {"lesion_diameter_error_mm": float("nan"),
            "lesion_size_in_range": float("nan")}
  lo = np.asarray([ranges[int(c)][0] for c in cls[known]])
  hi = np.asarray([ranges[int(c)][1] for c in cls[known]])
  m = measured[known]
  err = np.maximum(lo - m, 0.0) + np.maximum(m - hi, 0.0)
  return {"lesion_diameter_error_mm": float(err.mean()),
          "lesion_size_in_range": float(np.mean(err == 0.0))}


def _ct_channel(info: DatasetInfo) -> int | None:
  return info.modalities.index("ct") if "ct" in info.modalities else None


def _hu(images: np.ndarray, info: DatasetInfo, channel: int) -> np.ndarray:
  return info.to_physical(images)[..., channel]


def _body_masks(hu: np.ndarray) -> np.ndarray:
  return np.stack([physical.body_mask(x) for x in hu])


@dataclasses.dataclass
class _Real:
  """Everything about the real splits that every evaluated set reuses."""
  train_images: np.ndarray
  train_feats: np.ndarray
  test_images: np.ndarray
  train_hu: np.ndarray | None
  train_body: np.ndarray | None


def _score_set(images: np.ndarray, requested: Mapping[str, np.ndarray],
               feats: np.ndarray, real: _Real, real_test_feats: np.ndarray,
               info: DatasetInfo, model, params, s: Mapping[str, Any], judge=None
               ) -> tuple[dict[str, float], dict[str, Any]]:
  """All metrics of one image set against the real train split."""
  out: dict[str, float] = {}
  seed = int(s["seed"])
  tr = real.train_feats
  out["fd_domain"] = distances.frechet_distance(tr, feats)
  # Basic bootstrap over both sets: resampling adds FD's small-sample bias
  # a second time, which the reflection about the estimate takes back out.
  ci = bootstrap.bootstrap_ci(distances.frechet_distance, tr, feats,
                              num_resamples=max(2, int(s["bootstrap_resamples"])),
                              seed=seed, method="basic", lower_bound=0.0)
  out["fd_domain_ci_low"], out["fd_domain_ci_high"] = ci["ci_low"], ci["ci_high"]
  kid, kid_std = distances.kernel_inception_distance(
      tr, feats, num_subsets=int(s["kid_subsets"]),
      subset_size=int(s["kid_subset_size"]), seed=seed)
  out["kid_domain"], out["kid_domain_std"] = kid, kid_std
  out.update(manifold.prdc(tr, feats, k=int(s["prdc_k"])))

  predicted = classifier.predict_conditions(model, params, images)
  out.update(fidelity.condition_fidelity(predicted, requested, info.conditions))
  if judge is not None and info.conditions:
    read = classifier.predict_conditions(judge.model, judge.params, images)
    out.update({f"judge_{k}": v for k, v in fidelity.condition_fidelity(
        read, requested, info.conditions).items()})

  artifacts: dict[str, Any] = {}
  ch = _ct_channel(info)
  if ch is not None:
    hu = _hu(images, info, ch)
    body = _body_masks(hu)
    out.update(physical.hu_distribution_distances(
        real.train_hu, hu, paired=False, real_mask=real.train_body,
        generated_mask=body, seed=seed))
    artifacts["hu"], artifacts["body"] = hu, body
    if info.name == "ct_phantom" and "lesion" in requested:  # (ct channel only)
      measured = np.asarray([fidelity.lesion_diameter_from_image(
          x, spacing_mm=info.spacing_mm) for x in hu])
      out.update(lesion_range_error(measured, requested["lesion"],
                                    phantom_lesion_ranges()))

  # Every other channel: W1 of its foreground intensities in the units of
  # its intensity policy (SUV, normalised MRI, raw), named by modality.
  for c, (modality, transform) in enumerate(zip(info.modalities, info.intensity)):
    if c == ch:
      continue
    scored = physical.intensity_distance(real.train_images[..., c], images[..., c],
                                         transform, seed=seed)
    out.update({f"{key}_{modality}": v for key, v in scored.items()})

  rule = dict(mad_k=float(s["memorization_mad_k"]),
              min_fraction=float(s["memorization_min_fraction"]))
  audit_f = memorization.memorization_audit(feats, tr, real_test_feats, **rule)
  audit_p = memorization.memorization_audit(images, real.train_images,
                                            real.test_images, **rule)
  out["memorized_fraction"] = audit_f["memorized_fraction"]
  out["memorization_threshold"] = audit_f["threshold"]
  out["nearest_train_distance_median"] = float(np.median(audit_f["gen_to_train"]))
  out["memorized_fraction_pixel"] = audit_p["memorized_fraction"]
  out["memorization_threshold_pixel"] = audit_p["threshold"]
  out["nearest_train_distance_median_pixel"] = float(
      np.median(audit_p["gen_to_train"]))
  artifacts["audit_features"], artifacts["audit_pixels"] = audit_f, audit_p
  return out, artifacts


def evaluate_images(generated, requested: Mapping[str, np.ndarray], *,
                    real_train: Mapping[str, np.ndarray],
                    real_test: Mapping[str, np.ndarray], info: DatasetInfo,
                    model: classifier.FeatureNet, params,
                    settings: Mapping[str, Any] | None = None,
                    figures_dir: str | None = None,
                    baseline=None, judge=None) -> dict[str, Any]:
  """Every metric of `generated` and its real reference (test vs train).

  Args:
    generated: `[n, *spatial, C]` images in [-1, 1].
    requested: {field: `[n]`} the conditions they were generated for.
    real_train: real train split arrays (`image` + condition fields).
    real_test: real test split arrays, the reference "new patients".
    info: the dataset's DatasetInfo.
    model, params: the domain feature extractor.
    settings: `settings.eval_settings(...)`; defaults when None.
    figures_dir: where report figures go; None writes none. A baseline's
      figures go to its `baseline/` subfolder.
    baseline: optional `[n, *spatial, C]` images of another generator for the
      same `requested` conditions; scored against the same real side (the
      real features, HU and reference are computed once for both).
    judge: a `classifier.judge.Judge`; its reading of each set's conditions
      is reported as `judge_<condition metric>` (on the real test split: its
      `_real_reference`, how well the judge reads real images).

  Returns:
    flat dict: each metric name, `<name>_real_reference`, `baseline_<name>`
    when a baseline is given, `figures` ({name: path}, baseline ones as
    `baseline_<name>`) when figures were written, and `num_samples`,
    `num_real_train`, `num_real_test`, `seed` and
    `memorization_threshold_rule` (the rule and its number of test
    references, as text).
  """
  s = dict(settings_lib.DEFAULTS if settings is None else settings)
  sets = {"": generated} if baseline is None else {"": generated,
                                                   "baseline_": baseline}
  sets = {prefix: np.asarray(images, np.float32) for prefix, images in sets.items()}
  for prefix, images in sets.items():
    if images.ndim != len(info.image_shape) + 1 or (
        tuple(images.shape[1:]) != tuple(info.image_shape)):
      raise ValueError(f"{prefix or 'generated'} images must be [n, "
                       f"{', '.join(map(str, info.image_shape))}], got {images.shape}")
  n = generated.shape[0]
  if baseline is not None and sets["baseline_"].shape[0] != n:
    raise ValueError(f"baseline has {sets['baseline_'].shape[0]} images for {n} "
                     f"requested conditions")
  for f in info.conditions:
    if f.name not in requested or np.asarray(requested[f.name]).shape != (n,):
      raise ValueError(f"requested[{f.name!r}] must be [{n}]")
  k = int(s["prdc_k"])
  for name, size in (("generated", n), ("real_test", len(real_test["image"])),
                     ("real_train", len(real_train["image"]))):
    if size <= k:
      raise ValueError(f"{name} has {size} images; the k-NN metrics (k={k}) "
                       f"need more than {k}")

  train_images = np.asarray(real_train["image"], np.float32)
  test_images = np.asarray(real_test["image"], np.float32)
  train_feats = classifier.extract_features(model, params, train_images)
  test_feats = classifier.extract_features(model, params, test_images)
  ch = _ct_channel(info)
  train_hu = _hu(train_images, info, ch) if ch is not None else None
  real = _Real(train_images, train_feats, test_images, train_hu,
               _body_masks(train_hu) if ch is not None else None)
  test_cond = {f.name: np.asarray(real_test[f.name]) for f in info.conditions}
  ref, ref_art = _score_set(test_images, test_cond, test_feats, real,
                            test_feats, info, model, params, s, judge)

  metrics: dict[str, Any] = {}
  figures: dict[str, str] = {}
  for prefix, images in sets.items():
    feats = classifier.extract_features(model, params, images)
    scored, artifacts = _score_set(images, requested, feats, real, test_feats,
                                   info, model, params, s, judge)
    for key, value in scored.items():
      metrics[prefix + key] = value
      if not prefix:
        metrics[f"{key}_real_reference"] = ref[key]
    if figures_dir is not None and s["figures"]:
      written = report.write_figures(
          os.path.join(figures_dir, prefix.rstrip("_")), generated=images,
          requested=requested, train_images=train_images, info=info,
          gen_artifacts=artifacts, ref_artifacts=ref_art, real_train_hu=train_hu,
          real_train_body=real.train_body, num_pairs=int(s["num_pairs"]),
          grid_cols=int(s["grid_cols"]))
      figures.update({prefix + name: path for name, path in written.items()})
  metrics.update(num_samples=int(n), num_real_train=int(len(train_images)),
                 num_real_test=int(len(test_images)), seed=int(s["seed"]),
                 memorization_threshold_rule=ref_art["audit_features"]["threshold_rule"])
  if figures:
    metrics["figures"] = figures
  return metrics
