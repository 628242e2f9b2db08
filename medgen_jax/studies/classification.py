"""The downstream classifier's pieces: class subsets, training, scores, intervals.

Shared by the augmentation learning curve (`studies.downstream`) and the
cross-site experiment (`studies.cross_site`), so both train, score and summarise
in exactly the same way:

- the classifier is `medgen_jax.classifier`'s network with one head, for
  the classes kept by `config.classes` (a subset such as ('none', 'large')
  makes a task the phantom's 64x64 slices can answer); its recipe
  (`config.classifier`: steps, batch, lr, architecture) is fixed and the
  last step is scored: no checkpoint is selected on any held-out data;
- scores: macro-F1, balanced accuracy (mean per-class recall) and accuracy
  on held-out subjects;
- summaries: mean, sample std and a two-sided 95 % Student-t interval over
  seeds; arms are compared by the per-seed paired difference (same real
  images, same initialisation seed), summarised the same way.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

from medgen_jax import classifier
from medgen_jax.data.info import CATEGORICAL, ConditionField, DatasetInfo

METRICS = ("macro_f1", "balanced_accuracy", "accuracy")

log = logging.getLogger("medgen_jax.eval")


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


def balanced_accuracy(pred, true, num_classes: int) -> float:
  """Mean over the classes present in `true` of their recall."""
  m = confusion(pred, true, num_classes)
  support = m.sum(1)
  present = support > 0
  if not present.any():
    raise ValueError("balanced_accuracy of an empty label set")
  return float(np.mean(np.diag(m)[present] / support[present]))


def accuracy(pred, true) -> float:
  pred, true = np.asarray(pred).reshape(-1), np.asarray(true).reshape(-1)
  return float(np.mean(pred == true))


def scores(pred, true, num_classes: int) -> dict[str, Any]:
  """Every metric of `METRICS` and the confusion matrix (as lists)."""
  return {"macro_f1": macro_f1(pred, true, num_classes),
          "balanced_accuracy": balanced_accuracy(pred, true, num_classes),
          "accuracy": accuracy(pred, true),
          "confusion": confusion(pred, true, num_classes).tolist()}


@dataclasses.dataclass(frozen=True)
class ClassTask:
  """The classes a downstream classifier tells apart.

  Attributes:
    field: the dataset's categorical field (e.g. lesion).
    kept: its class indices kept, in task order.
    task_field: a field over the kept classes only (task labels 0..k-1).
  """
  field: ConditionField
  kept: tuple[int, ...]
  task_field: ConditionField

  @property
  def num_classes(self) -> int:
    return len(self.kept)

  def to_task(self, labels) -> np.ndarray:
    """Dataset class indices -> task labels (-1 for classes not kept, unknown)."""
    labels = np.asarray(labels)
    lookup = np.full(self.field.num_classes + 1, -1, np.int32)  # last entry: -1 in
    lookup[list(self.kept)] = np.arange(len(self.kept))
    return lookup[np.where(labels >= 0, labels, self.field.num_classes)]


def class_task(info: DatasetInfo, field: str, classes: Sequence[str | int] = ()) -> ClassTask:
  """The task of `field` over `classes` (names or indices; empty = all).

  Raises:
    ValueError: the field is not categorical, a class is unknown or repeated,
      or fewer than two classes are kept.
  """
  f = info.condition(field)  # KeyError naming the fields if absent
  if f.kind != CATEGORICAL:
    raise ValueError(f"downstream field {field!r} must be categorical")
  kept = (tuple(int(f.parse(str(c))) for c in classes) if len(classes)
          else tuple(range(f.num_classes)))
  if len(set(kept)) != len(kept) or len(kept) < 2:
    raise ValueError(f"config.classes {list(classes)} must name >= 2 distinct classes "
                     f"of {field!r} ({list(f.class_names)})")
  names = tuple(f.class_names[k] if f.class_names else str(k) for k in kept)
  return ClassTask(f, kept, ConditionField(f.name, CATEGORICAL, len(kept), names))


def train_and_test(images, labels, task: ClassTask, tests: Mapping[str, Mapping[str, np.ndarray]],
                   recipe: classifier.Recipe, seed: int) -> dict[str, dict[str, Any]]:
  """Trains the classifier on (images, task labels) and scores it on each test set.

  Args:
    images: `[N, *spatial, C]` in [-1, 1].
    labels: `[N]` task labels in [0, k).
    tests: name -> {'image': ..., 'label': task labels}.
    recipe: the classifier's recipe (`classifier.from_section(config.classifier)`;
      its seed and fields are not used).
    seed: initialisation and batch order.

  Returns:
    test name -> `scores(...)`.
  """
  start = time.perf_counter()
  labels = np.asarray(labels)
  if labels.min() < 0 or labels.max() >= task.num_classes:
    raise ValueError("train_and_test: labels must be task labels in [0, k)")
  recipe = dataclasses.replace(recipe, seed=int(seed))
  model, params, _ = classifier.train_feature_extractor(
      images, {task.field.name: labels}, (task.task_field,), **recipe.optimisation,
      **recipe.architecture)
  out = {}
  for name, test in tests.items():
    pred = classifier.predict_conditions(model, params, test["image"])[task.field.name]
    out[name] = scores(pred, test["label"], task.num_classes)
  # Experiments train tens of classifiers: one line each shows progress.
  log.info("classifier seed %d on %d images: %s (%.1f s)", seed, len(labels),
           ", ".join(f"{k} macro-F1 {v['macro_f1']:.3f}" for k, v in out.items()),
           time.perf_counter() - start)
  return out


def summary(values: Sequence[float], *, level: float = 0.95) -> dict[str, Any]:
  """Mean, sample std (ddof=1) and the Student-t interval of the mean over seeds."""
  v = np.asarray(values, np.float64)
  mean = float(v.mean())
  if len(v) < 2:
    return {"mean": mean, "std": 0.0, "ci_low": float("nan"), "ci_high": float("nan"),
            "n": int(len(v)), "values": [float(x) for x in v]}
  std = float(v.std(ddof=1))
  half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1)) * std / np.sqrt(len(v))
  return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half,
          "n": int(len(v)), "values": [float(x) for x in v]}


def summarise(runs: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]] | None
              = None) -> dict[str, Any]:
  """Per metric: `summary` over runs (one per seed), and with `reference`
  (the same seeds' baseline runs, in the same order) the paired difference."""
  out: dict[str, Any] = {m: summary([r[m] for r in runs]) for m in METRICS}
  if reference is not None:
    if len(reference) != len(runs):
      raise ValueError(f"{len(runs)} runs against {len(reference)} reference runs")
    out["paired_difference"] = {m: summary([a[m] - b[m] for a, b in zip(runs, reference)])
                                for m in METRICS}
  return out


def nested_balanced(task: ClassTask, num: int) -> np.ndarray:
  """`[num]` dataset class indices cycling over the kept classes, so every
  prefix `[:m]` holds each class floor or ceil of m / k times."""
  return np.asarray(task.kept, np.int32)[np.arange(num) % task.num_classes]
