"""The data-augmentation experiment: do synthetic images help a classifier?

Protocol (`run_downstream`), for every seed:
  1. draw a small real subset of the train split (`num_real` images, the same
     subset for every arm of that seed, a different one per seed);
  2. arm 'real': train the lesion classifier on the subset alone;
  3. arm 'real+<generator>': for each generator, generate `num_synthetic`
     images for balanced requested classes of `field` (every class equally
     often; the other conditions copied from random rows of the real subset),
     label them with the requested class, and train the same classifier, for
     the same number of steps, on subset + synthetic images (batches drawn
     uniformly from the union);
  4. test every classifier on the held-out real test split (other subjects).
The classifier is the domain extractor's CNN
(`medgen_jax.train.extractor.train_feature_extractor` with only `field`), trained from the same init seed in every arm. Results are
macro-F1 and accuracy, mean and std (ddof=1) over seeds per arm, the per-seed
values, and the per-seed paired difference to 'real'.

Generators come from training workdirs (`config.generators`: arm name ->
workdir, each restored with its `config.generator_configs[name]`); every
workdir must hold a checkpoint (`experiments/downstream.py` trains the missing
ones first).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import numpy as np

from matplotlib.figure import Figure  # Agg canvas, no pyplot state

from medgen_jax import data as data_lib
from medgen_jax.data.info import CATEGORICAL, DatasetInfo
from medgen_jax.eval import reference
from medgen_jax.inference import sample
from medgen_jax.train import extractor

GenerateFn = Callable[[Mapping[str, np.ndarray], int], np.ndarray]


def confusion(pred, true, num_classes: int) -> np.ndarray:
  """`[num_classes, num_classes]` counts, rows = true class, cols = predicted."""
  pred, true = np.asarray(pred).reshape(-1), np.asarray(true).reshape(-1)
  if pred.shape != true.shape:
    raise ValueError(f"{pred.shape[0]} predictions for {true.shape[0]} labels")
  for name, x in (("pred", pred), ("true", true)):
    if x.size and (x.min() < 0 or x.max() >= num_classes):
      raise ValueError(f"{name} has labels outside [0, {num_classes})")
  m = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(m, (true.astype(np.int64), pred.astype(np.int64)), 1)
  return m


def macro_f1(pred, true, num_classes: int) -> float:
  """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN).

  A class absent from both `true` and `pred` has an undefined F1 and is left
  out of the mean; a class that occurs in only one of them scores 0.
  """
  m = confusion(pred, true, num_classes)
  tp = np.diag(m).astype(np.float64)
  denom = 2 * tp + (m.sum(0) - tp) + (m.sum(1) - tp)
  present = denom > 0
  if not present.any():
    raise ValueError("macro_f1 of an empty label set")
  return float(np.mean(2 * tp[present] / denom[present]))


def accuracy(pred, true) -> float:
  pred, true = np.asarray(pred).reshape(-1), np.asarray(true).reshape(-1)
  return float(np.mean(pred == true))


def balanced_conditions(info: DatasetInfo, field: str,
                        pool: Mapping[str, np.ndarray], num: int, *,
                        seed: int) -> dict[str, np.ndarray]:
  """Conditions for `num` synthetic images: `field` cycles over its classes
  (balanced, shuffled); other fields are copied from random rows of `pool`."""
  f = info.condition(field)
  if f.kind != CATEGORICAL:
    raise ValueError(f"downstream field {field!r} must be categorical")
  rng = np.random.default_rng(seed)
  out = reference.draw_conditions(pool, info, num, seed=seed)
  out[field] = rng.permutation(np.arange(num) % f.num_classes).astype(np.int32)
  return out


def _train_and_test(images, labels, field_spec, test, cfg, seed) -> dict[str, Any]:
  model, params, _ = extractor.train_feature_extractor(
      images, {field_spec.name: labels}, (field_spec,), steps=int(cfg.steps),
      batch_size=int(cfg.batch_size), seed=seed, lr=float(cfg.lr),
      **extractor.architecture_from(cfg))
  pred = extractor.predict_conditions(model, params, test["image"])[field_spec.name]
  true = test[field_spec.name]
  return {"macro_f1": macro_f1(pred, true, field_spec.num_classes),
          "accuracy": accuracy(pred, true),
          "confusion": confusion(pred, true, field_spec.num_classes).tolist()}


def checkpoint_generators(config: Any, info: DatasetInfo) -> dict[str, GenerateFn]:
  """Generate functions of `config.generators` (name -> workdir): the latest
  fp32 EMA generator of each, built with `config.generator_configs[name]`.

  Raises:
    FileNotFoundError: a workdir holds no checkpoint.
  """
  out = {}
  for name, workdir in config.generators.items():
    out[name], _ = sample.generator_fn(config.generator_configs[name], workdir, info,
                                       precision="fp32")
  return out


def check_config(config: Any, info: DatasetInfo, generators=None) -> None:
  """One ValueError for a bad experiment config, before anything is trained.

  `generators`: the in-memory arms given to `run_downstream`, or None when
  they come from `config.generators` (whose configs are then checked too).
  """
  c = config
  f = info.condition(c.field)  # KeyError naming the fields if absent
  if f.kind != CATEGORICAL:
    raise ValueError(f"config.field {c.field!r} must be categorical")
  if len(c.seeds) < 1 or int(c.num_real) < f.num_classes:
    raise ValueError(f"need >= 1 seed and num_real >= {f.num_classes}, got "
                     f"{list(c.seeds)}, {c.num_real}")
  if int(c.num_synthetic) < 1:
    raise ValueError(f"num_synthetic must be >= 1, got {c.num_synthetic}")
  names = set(generators if generators is not None else c.generators)
  if "real" in names:
    raise ValueError("'real' is reserved for the real-only arm")
  if generators is None:
    missing = sorted(set(c.generators) - set(c.generator_configs))
    if missing:
      raise ValueError(f"config.generator_configs lacks {missing}")
    for name, gc in c.generator_configs.items():
      if gc.data.image_size != c.data.image_size or tuple(gc.data.modalities) != tuple(
          c.data.modalities) or gc.data.mode != c.data.mode:
        raise ValueError(f"generator {name!r} is configured for other data "
                         f"({gc.data.image_size}, {gc.data.modalities}, "
                         f"{gc.data.mode}) than the classifier")


def _summary(values: list[float]) -> dict[str, Any]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()),
          "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "values": [float(x) for x in v]}


def run_downstream(config: Any, workdir: str, *,
                   generators: Mapping[str, GenerateFn] | None = None
                   ) -> dict[str, Any]:
  """Runs the augmentation experiment; writes results.json and a bar chart.

  Args:
    config: see `configs/downstream_lesion.py` (data, field, num_real,
      num_synthetic, seeds, max_test, classifier, generators,
      generator_configs).
    workdir: output directory.
    generators: optional {arm name: generate(conditions, seed) -> images
      `[n, *spatial, C]` in [-1, 1]} used instead of `config.generators`
      (tests, or generators held in memory).

  Returns:
    the results dict written to `workdir/results.json`.
  """
  info = data_lib.load_info(config.data)
  check_config(config, info, generators)
  f = info.condition(config.field)
  train = data_lib.load_arrays(config.data, split="train")
  test = data_lib.load_arrays(config.data, split="test",
                              max_examples=config.max_test)
  known = np.flatnonzero(train[f.name] >= 0)
  if len(known) < int(config.num_real):
    raise ValueError(f"train split has {len(known)} labelled images, fewer "
                     f"than num_real {config.num_real}")
  if generators is None:
    generators = checkpoint_generators(config, info)
  arms = ["real"] + [f"real+{name}" for name in generators]
  per_seed: dict[str, list[dict]] = {a: [] for a in arms}
  for seed in (int(s) for s in config.seeds):
    rng = np.random.default_rng(seed)
    subset = {k: v[rng.choice(known, int(config.num_real), replace=False)]
              for k, v in train.items()}
    per_seed["real"].append(_train_and_test(
        subset["image"], subset[f.name], f, test, config.classifier, seed))
    for name, generate in generators.items():
      cond = balanced_conditions(info, f.name, subset, int(config.num_synthetic),
                                 seed=seed)
      synth = np.asarray(generate(cond, seed), np.float32)
      if synth.shape != (len(cond[f.name]), *info.image_shape):
        raise ValueError(f"generator {name!r} returned {synth.shape}, expected "
                         f"{(len(cond[f.name]), *info.image_shape)}")
      images = np.concatenate([subset["image"], synth])
      labels = np.concatenate([subset[f.name], cond[f.name]])
      per_seed[f"real+{name}"].append(_train_and_test(
          images, labels, f, test, config.classifier, seed))

  results: dict[str, Any] = {"arms": {}, "protocol": protocol(config, info, test)}
  for arm in arms:
    entry = {m: _summary([r[m] for r in per_seed[arm]])
             for m in ("macro_f1", "accuracy")}
    entry["confusion_per_seed"] = [r["confusion"] for r in per_seed[arm]]
    if arm != "real":
      entry["paired_difference_to_real"] = {
          m: _summary([a[m] - b[m] for a, b in zip(per_seed[arm], per_seed["real"])])
          for m in ("macro_f1", "accuracy")}
    results["arms"][arm] = entry
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as fh:
    json.dump(results, fh, indent=2)
  results["figure"] = save_bar_chart(os.path.join(workdir, "results.png"),
                                     results)
  return results


def protocol(config: Any, info: DatasetInfo, test: Mapping[str, np.ndarray]
             ) -> dict[str, Any]:
  """The experiment's settings as JSON-able facts (stored with the results)."""
  c = config
  return {
      "dataset": info.name, "image_shape": list(info.image_shape),
      "field": c.field, "classes": list(info.condition(c.field).class_names),
      "num_real": int(c.num_real), "num_synthetic": int(c.num_synthetic),
      "seeds": [int(s) for s in c.seeds], "num_test": int(len(test["image"])),
      "test_split": "test (held-out subjects)",
      "classifier": {k: (list(v) if isinstance(v, (tuple, list)) else v)
                     for k, v in dict(c.classifier).items()},
      "synthetic_conditions": "balanced classes; other fields copied from "
                              "random rows of the real subset",
      "generators": dict(c.generators),
      "std": "sample std over seeds (ddof=1)",
  }


def save_bar_chart(path: str, results: Mapping[str, Any]) -> str:
  """Bars: mean macro-F1 and accuracy per arm, std error bars, seed dots."""
  arms = list(results["arms"])
  metrics = ("macro_f1", "accuracy")
  fig = Figure(figsize=(2.0 + 1.4 * len(arms), 3.2))
  ax = fig.subplots()
  width = 0.8 / len(arms)
  for i, arm in enumerate(arms):
    xs = np.arange(len(metrics)) + (i - (len(arms) - 1) / 2) * width
    entry = results["arms"][arm]
    ax.bar(xs, [entry[m]["mean"] for m in metrics], width,
           yerr=[entry[m]["std"] for m in metrics], capsize=3, label=arm)
    for x, m in zip(xs, metrics):
      vals = entry[m]["values"]
      ax.plot([x] * len(vals), vals, "k.", markersize=3)
  ax.set_xticks(np.arange(len(metrics)), metrics)
  ax.set_ylim(0, 1)
  n = len(results["arms"][arms[0]]["macro_f1"]["values"])
  ax.set_title(f"lesion classifier on real test subjects ({n} seeds)", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  return path
