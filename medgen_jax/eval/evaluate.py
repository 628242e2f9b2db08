"""`evaluate(config, workdir)`: every generation metric with its real reference.

One evaluation run:

1. checks that `workdir` holds a checkpoint (before anything expensive);
2. loads the real train and test splits (`medgen_jax.data.load_arrays`);
3. gets the domain feature extractor: restored from its orbax cache, or
   trained once on the real train split and cached (`get_extractor`);
4. draws `num_samples` condition tuples from the real test split's rows (so
   class balance and covariate mix match the reference) and generates images
   for them with the latest EMA generator (`medgen_jax.inference.sample`);
5. scores the generated set against the real TRAIN split, and scores the real
   TEST split against the real train split in exactly the same way: the
   second number is the `*_real_reference` of the first (what a perfect
   generator that draws new patients from the data distribution would get, at
   the reference's sample size);
6. writes `workdir/eval/metrics.json` (flat keys) and the figures
   (`medgen_jax.eval.report`).

`evaluate_images` is step 5 alone, on arrays: tests call it with real test
images "as if generated" and must then get every metric equal to its
reference.

Eval settings are read from `config.eval` with defaults (`DEFAULTS`), so a
training config without an `eval` section works.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Mapping

import numpy as np

from medgen_jax.data.info import CATEGORICAL, DatasetInfo
from medgen_jax.eval import (bootstrap, distances, features, fidelity, manifold,
                             memorization, physical)

DEFAULTS: dict[str, Any] = dict(
    num_samples=None,          # None: as many as the real test split
    seed=0,                    # noise and condition draws
    generate_batch_size=64,
    extractor_path=None,       # None: a cache dir keyed by dataset identity
    extractor_steps=1500,
    extractor_batch_size=64,
    extractor_lr=1e-3,
    extractor_widths=(16, 32, 64),
    extractor_feature_dim=64,
    # Space-to-depth by 2 (the first stage runs on 4x fewer positions, every
    # pixel kept) and mean+max pooling: unlike the full-resolution, mean-pooled
    # extractor it reads the phantom's lesion class (docs/results.md).
    extractor_stem_patch=2,
    extractor_pooling="mean_max",
    extractor_seed=0,
    max_train=None,            # cap on real train images (None: all)
    max_test=None,             # cap on real test images (None: all)
    prdc_k=5,
    kid_subsets=100,
    kid_subset_size=1000,
    bootstrap_resamples=50,
    memorization_percentile=1.0,
    num_pairs=8,
    grid_cols=8,
    figures=True,
)

# Settings that change what the extractor is; part of its cache key.
_EXTRACTOR_KEYS = ("extractor_steps", "extractor_batch_size", "extractor_lr",
                   "extractor_widths", "extractor_feature_dim", "extractor_seed",
                   "extractor_stem_patch", "extractor_pooling",
                   "max_train")


def eval_settings(config: Any) -> dict[str, Any]:
  """`DEFAULTS` overridden by `config.eval` (absent or partial is fine)."""
  given = config.get("eval", None) if hasattr(config, "get") else None
  given = dict(given or {})
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.eval has unknown fields {unknown}; known: "
                     f"{sorted(DEFAULTS)}")
  s = {**DEFAULTS, **given}
  if s["num_samples"] is not None and int(s["num_samples"]) < 2:
    raise ValueError(f"eval.num_samples must be >= 2 (or None), got "
                     f"{s['num_samples']}")
  for key in ("extractor_steps", "extractor_batch_size", "generate_batch_size",
              "prdc_k", "kid_subsets", "num_pairs", "grid_cols"):
    if int(s[key]) < 1:
      raise ValueError(f"eval.{key} must be >= 1, got {s[key]}")
  if not 0.0 < float(s["memorization_percentile"]) < 100.0:
    raise ValueError(f"eval.memorization_percentile must be in (0, 100), got "
                     f"{s['memorization_percentile']}")
  s["extractor_widths"] = tuple(int(w) for w in s["extractor_widths"])
  features.make_extractor((), **features.architecture_from(s, prefix="extractor_"))
  return s


# ---------------------------------------------------------------- checkpoints


def latest_checkpoint_step(workdir: str) -> int | None:
  """Newest complete checkpoint step under `workdir/checkpoints`, or None.

  orbax writes into a temporary directory and renames it to the bare step
  number when complete, so only all-digit names count.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  steps = [int(d) for d in os.listdir(directory)
           if d.isdigit() and os.path.isdir(os.path.join(directory, d))]
  return max(steps) if steps else None


def require_checkpoint(workdir: str) -> int:
  """The latest checkpoint step, or a FileNotFoundError saying how to get one."""
  step = latest_checkpoint_step(workdir)
  if step is None:
    raise FileNotFoundError(
        f"no checkpoint in {os.path.abspath(os.path.join(workdir, 'checkpoints'))}"
        f"; train first: python -m experiments.train --config ... --workdir "
        f"{workdir}")
  return step


# ------------------------------------------------------------------ extractor


def _dataset_identity(data_config: Any, info: DatasetInfo) -> dict[str, Any]:
  from medgen_jax.data import builders  # pylint: disable=import-outside-toplevel
  summary = builders.build(data_config)
  return {"builder_dir": os.path.abspath(summary["builder_dir"]),
          "name": info.name, "image_shape": list(info.image_shape),
          "modalities": list(info.modalities),
          "intensity": [[t.modality, t.lo, t.hi] for t in info.intensity],
          "conditions": [f.name for f in info.conditions]}


def extractor_key(data_config: Any, info: DatasetInfo,
                  settings: Mapping[str, Any]) -> dict[str, Any]:
  """What identifies an extractor: the dataset (built dir, channels, window)
  and its training settings. Stored beside it and compared on reuse."""
  return {"dataset": _dataset_identity(data_config, info),
          "training": {k: (list(settings[k]) if isinstance(settings[k], tuple)
                           else settings[k]) for k in _EXTRACTOR_KEYS}}


def extractor_path(data_config: Any, info: DatasetInfo,
                   settings: Mapping[str, Any]) -> str:
  """`settings['extractor_path']`, or `<data_dir>/medgen_extractors/<name>-<hash>`.

  The default sits beside the datasets, so every run on the same dataset (and
  extractor settings) shares one extractor.
  """
  if settings.get("extractor_path"):
    return os.path.abspath(os.fspath(settings["extractor_path"]))
  from medgen_jax.data import builders  # pylint: disable=import-outside-toplevel
  key = extractor_key(data_config, info, settings)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
  return os.path.join(builders.data_dir(data_config), "medgen_extractors",
                      f"{info.name}-{digest[:12]}")


def get_extractor(data_config: Any, info: DatasetInfo, train: Mapping[str, np.ndarray],
                  settings: Mapping[str, Any]
                  ) -> tuple[features.FeatureNet, dict, dict[str, Any]]:
  """Restores the cached extractor, or trains it on `train` and caches it.

  Args:
    data_config: the dataset config (identity of the cache).
    info: its DatasetInfo.
    train: real train split arrays (`image` `[N, *spatial, C]` + conditions).
    settings: `eval_settings(config)`.

  Returns:
    (model, params, metadata); metadata['reused'] is True when it was restored.

  Raises:
    ValueError: a cached extractor at the configured path was trained on a
      different dataset or with different settings.
  """
  path = extractor_path(data_config, info, settings)
  key = extractor_key(data_config, info, settings)
  if os.path.exists(os.path.join(path, "extractor.json")):
    model, params, meta = features.load_extractor(path)
    if meta.get("key") != json.loads(json.dumps(key)):
      raise ValueError(
          f"the feature extractor at {path} was trained for {meta.get('key')}, "
          f"not for this evaluation ({key}); delete it or set "
          f"config.eval.extractor_path elsewhere")
    return model, params, {**meta, "reused": True, "path": path}
  model, params, history = features.train_feature_extractor(
      train["image"], {f.name: train[f.name] for f in info.conditions},
      info.conditions, steps=int(settings["extractor_steps"]),
      batch_size=int(settings["extractor_batch_size"]),
      seed=int(settings["extractor_seed"]), lr=float(settings["extractor_lr"]),
      **features.architecture_from(settings, prefix="extractor_"))
  meta = {"key": key, "num_train_images": int(train["image"].shape[0]),
          "final_train_metrics": history[-1]}
  features.save_extractor(path, model, params, input_shape=info.image_shape,
                          metadata=meta)
  return model, params, {**meta, "reused": False, "path": path}


# ---------------------------------------------------------------- conditions


def draw_conditions(reference: Mapping[str, np.ndarray], info: DatasetInfo,
                    num: int, *, seed: int) -> dict[str, np.ndarray]:
  """`num` condition tuples drawn from the rows of a real split.

  Whole rows are drawn (so correlations between fields are kept): a random
  permutation of all rows, repeated as often as needed, then truncated. With
  `num` equal to the split size the requested conditions are exactly the
  split's conditions, so class balance matches the reference exactly.

  Returns:
    {field: `[num]`} int32 categorical / float32 continuous.
  """
  n = len(np.asarray(reference[info.conditions[0].name])) if info.conditions else 0
  if n < 1:
    raise ValueError("draw_conditions needs a split with condition fields")
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(n) for _ in range(-(-num // n))])[:num]
  return {f.name: np.asarray(reference[f.name])[order].astype(
      np.int32 if f.kind == CATEGORICAL else np.float32) for f in info.conditions}


# ------------------------------------------------------------------- metrics


def phantom_lesion_ranges() -> dict[int, tuple[float, float]] | None:
  """Nominal diameter range (mm) per lesion class of the ct_phantom."""
  from medgen_jax.data import phantom  # pylint: disable=import-outside-toplevel
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
               info: DatasetInfo, model, params, s: Mapping[str, Any]
               ) -> tuple[dict[str, float], dict[str, Any]]:
  """All metrics of one image set against the real train split."""
  out: dict[str, float] = {}
  seed = int(s["seed"])
  tr = real.train_feats
  out["fd_domain"] = distances.frechet_distance(tr, feats)
  # Percentile bootstrap over both sets. Resamples duplicate rows, which
  # shrinks the covariances, so small sets can put the point estimate below
  # the interval: compare intervals of metric and reference, not the point.
  ci = bootstrap.bootstrap_ci(distances.frechet_distance, tr, feats,
                              num_resamples=max(2, int(s["bootstrap_resamples"])),
                              seed=seed)
  out["fd_domain_ci_low"], out["fd_domain_ci_high"] = ci["ci_low"], ci["ci_high"]
  kid, kid_std = distances.kernel_inception_distance(
      tr, feats, num_subsets=int(s["kid_subsets"]),
      subset_size=int(s["kid_subset_size"]), seed=seed)
  out["kid_domain"], out["kid_domain_std"] = kid, kid_std
  out.update(manifold.prdc(tr, feats, k=int(s["prdc_k"])))

  predicted = features.predict_conditions(model, params, images)
  out.update(fidelity.condition_fidelity(predicted, requested, info.conditions))

  artifacts: dict[str, Any] = {}
  ch = _ct_channel(info)
  if ch is not None:
    hu = _hu(images, info, ch)
    body = _body_masks(hu)
    out.update(physical.hu_distribution_distances(
        real.train_hu, hu, paired=False, real_mask=real.train_body,
        generated_mask=body, seed=seed))
    artifacts["hu"], artifacts["body"] = hu, body
    if info.name == "ct_phantom" and "lesion" in requested:
      measured = np.asarray([fidelity.lesion_diameter_from_image(
          x, spacing_mm=info.spacing_mm) for x in hu])
      out.update(lesion_range_error(measured, requested["lesion"],
                                    phantom_lesion_ranges()))

  pct = float(s["memorization_percentile"])
  audit_f = memorization.memorization_audit(feats, tr, real_test_feats,
                                            percentile=pct)
  audit_p = memorization.memorization_audit(images, real.train_images,
                                            real.test_images, percentile=pct)
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
                    model: features.FeatureNet, params,
                    settings: Mapping[str, Any] | None = None,
                    figures_dir: str | None = None,
                    baseline=None) -> dict[str, Any]:
  """Every metric of `generated` and its real reference (test vs train).

  Args:
    generated: `[n, *spatial, C]` images in [-1, 1].
    requested: {field: `[n]`} the conditions they were generated for.
    real_train: real train split arrays (`image` + condition fields).
    real_test: real test split arrays, the reference "new patients".
    info: the dataset's DatasetInfo.
    model, params: the domain feature extractor.
    settings: `eval_settings(...)`; defaults when None.
    figures_dir: where report figures go; None writes none. A baseline's
      figures go to its `baseline/` subfolder.
    baseline: optional `[n, *spatial, C]` images of another generator for the
      same `requested` conditions; scored against the same real side (the
      real features, HU and reference are computed once for both).

  Returns:
    flat dict: each metric name, `<name>_real_reference`, `baseline_<name>`
    when a baseline is given, `figures` ({name: path}, baseline ones as
    `baseline_<name>`) when figures were written, and `num_samples`,
    `num_real_train`, `num_real_test`, `seed`.
  """
  s = dict(DEFAULTS if settings is None else settings)
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
  train_feats = features.extract_features(model, params, train_images)
  test_feats = features.extract_features(model, params, test_images)
  ch = _ct_channel(info)
  train_hu = _hu(train_images, info, ch) if ch is not None else None
  real = _Real(train_images, train_feats, test_images, train_hu,
               _body_masks(train_hu) if ch is not None else None)
  test_cond = {f.name: np.asarray(real_test[f.name]) for f in info.conditions}
  ref, ref_art = _score_set(test_images, test_cond, test_feats, real,
                            test_feats, info, model, params, s)

  metrics: dict[str, Any] = {}
  figures: dict[str, str] = {}
  for prefix, images in sets.items():
    feats = features.extract_features(model, params, images)
    scored, artifacts = _score_set(images, requested, feats, real, test_feats,
                                   info, model, params, s)
    for key, value in scored.items():
      metrics[prefix + key] = value
      if not prefix:
        metrics[f"{key}_real_reference"] = ref[key]
    if figures_dir is not None and s.get("figures", True):
      from medgen_jax.eval import report  # pylint: disable=import-outside-toplevel
      written = report.write_figures(
          os.path.join(figures_dir, prefix.rstrip("_")), generated=images,
          requested=requested, train_images=train_images, info=info,
          gen_artifacts=artifacts, ref_artifacts=ref_art, real_train_hu=train_hu,
          real_train_body=real.train_body, num_pairs=int(s["num_pairs"]),
          grid_cols=int(s["grid_cols"]))
      figures.update({prefix + name: path for name, path in written.items()})
  metrics.update(num_samples=int(n), num_real_train=int(len(train_images)),
                 num_real_test=int(len(test_images)), seed=int(s["seed"]))
  if figures:
    metrics["figures"] = figures
  return metrics


# ----------------------------------------------------------------- end to end


def load_real(data_config: Any, settings: Mapping[str, Any]
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(train, test) split arrays, capped at `max_train` / `max_test` images."""
  from medgen_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  train = data_lib.load_arrays(data_config, split="train",
                               max_examples=settings["max_train"])
  test = data_lib.load_arrays(data_config, split="test",
                              max_examples=settings["max_test"])
  return train, test


def write_metrics(path: str, metrics: Mapping[str, Any]) -> str:
  """Writes flat metrics as JSON (NaN as null, so strict parsers accept it)."""
  def clean(v):
    if isinstance(v, (float, np.floating)):
      return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
      return int(v)
    return v
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({k: clean(v) for k, v in metrics.items()}, f, indent=2,
              sort_keys=True)
  return path


GenerateFn = Callable[[Mapping[str, np.ndarray], int], np.ndarray]


def checkpoint_generator(config: Any, workdir: str, info: DatasetInfo, *,
                         batch_size: int = 64) -> tuple[GenerateFn, int]:
  """(generate(conditions, seed) -> `[n, *spatial, C]` images in [-1, 1],
  checkpoint step) for the latest fp32 EMA generator in `workdir`."""
  from medgen_jax.inference import sample  # pylint: disable=import-outside-toplevel
  return sample.generator_fn(config, workdir, info, precision="fp32",
                             batch_size=batch_size)


def baseline_generator_config(config: Any, baseline_workdir: str) -> Any:
  """`config` with the model section the baseline run in `baseline_workdir`
  was trained with (its `config.json`), after checking it has a checkpoint.

  Raises:
    FileNotFoundError: no checkpoint or no config.json there.
    ValueError: the baseline was trained on other data (image shape,
      modalities) than `config`.
  """
  import copy  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  require_checkpoint(baseline_workdir)
  path = os.path.join(baseline_workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"baseline run {os.path.abspath(baseline_workdir)} has no "
                            f"config.json to rebuild its generator from")
  with open(path) as f:
    saved = json.load(f)
  for field in ("image_size", "depth", "mode", "modalities"):
    mine, theirs = config.data.get(field), saved.get("data", {}).get(field)
    if isinstance(mine, tuple):
      mine = list(mine)
    if theirs is not None and mine != theirs:
      raise ValueError(f"baseline run {baseline_workdir} was trained with "
                       f"data.{field}={theirs!r}, this evaluation uses {mine!r}")
  out = copy.deepcopy(config)
  with out.unlocked():
    out.model = ml_collections.ConfigDict(saved["model"])
  return out


def evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Evaluates the latest checkpoint in `workdir`; writes `workdir/eval/`.

  Returns:
    the flat metrics dict also written to `workdir/eval/metrics.json`, with
    `checkpoint_step`, the extractor's path and whether it was reused.
    A translation config (`config.task == 'translation'`) returns
    `eval.translation.evaluate_translation`'s paired metrics instead.
    With `config.baseline_workdir` (e.g. a `:cnn` run on the same data and
    budget) its generator, rebuilt from its own `config.json`, is scored on
    the same requested conditions, noise seed and extractor: `baseline_<key>`
    for every metric, `baseline_checkpoint_step`, and figures under
    `eval/figures/baseline/`.
  """
  if config.get("task", "generation") == "translation":
    from medgen_jax.eval import translation  # pylint: disable=import-outside-toplevel
    return translation.evaluate_translation(
        config, workdir, baseline_workdir=config.get("baseline_workdir") or None)
  s = eval_settings(config)
  step = require_checkpoint(workdir)
  baseline_dir = config.get("baseline_workdir") or None
  baseline_config = baseline_generator_config(config, baseline_dir) if baseline_dir else None
  from medgen_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  info = data_lib.load_info(config.data)
  if not info.conditions:
    raise ValueError(f"dataset {info.name!r} has no condition fields: the "
                     f"domain extractor has nothing to learn")
  train, test = load_real(config.data, s)
  model, params, meta = get_extractor(config.data, info, train, s)
  num = int(s["num_samples"] or len(test["image"]))
  requested = draw_conditions(test, info, num, seed=int(s["seed"]))
  generate, gen_step = checkpoint_generator(
      config, workdir, info, batch_size=int(s["generate_batch_size"]))
  generated = generate(requested, int(s["seed"]))
  baseline = None
  if baseline_config is not None:
    generate_baseline, base_step = checkpoint_generator(
        baseline_config, baseline_dir, info, batch_size=int(s["generate_batch_size"]))
    baseline = generate_baseline(requested, int(s["seed"]))
  out_dir = os.path.join(workdir, "eval")
  metrics = evaluate_images(generated, requested, real_train=train,
                            real_test=test, info=info, model=model,
                            params=params, settings=s,
                            figures_dir=os.path.join(out_dir, "figures"),
                            baseline=baseline)
  metrics.update(checkpoint_step=int(gen_step if gen_step is not None else step),
                 extractor_path=meta["path"], extractor_reused=meta["reused"])
  if baseline_config is not None:
    metrics.update(baseline_checkpoint_step=int(
        base_step if base_step is not None else require_checkpoint(baseline_dir)),
                   baseline_workdir=os.path.abspath(baseline_dir))
  metrics.update({f"figure_{k}": os.path.relpath(v, out_dir)
                  for k, v in metrics.pop("figures", {}).items()})
  write_metrics(os.path.join(out_dir, "metrics.json"), metrics)
  return metrics
