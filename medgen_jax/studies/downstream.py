"""The augmentation experiment: do synthetic images help a small-data classifier?

Protocol (`run_downstream`), fixed before any test result is seen and stored
in results.json:

  * task: `config.field` over `config.classes` (e.g. lesion none vs large);
    examples of other classes are left out everywhere;
  * test set: every example of the held-out splits `config.test_splits`
    (subjects never seen by the classifier nor by the generators, which are
    trained on the train split); no split is used to select anything;
  * for every seed: a random order of the labelled train examples; the real
    set of size n is its first n (nested sets, so the curve's points differ
    only in n). Arm 'real' trains on it alone. For each generator, one
    synthetic set per seed (noise seed = seed) of the largest size needed,
    its requested classes cycling over the task's classes (every prefix is
    balanced) and its other conditions copied from random rows of the train
    split; arm '<generator> x<r>' trains on the n real images plus the first
    round(r * n) synthetic ones, labelled with the requested class, batches
    drawn uniformly from the union;
  * the classifier (`studies.classification`) has one fixed recipe for every
    arm and size; its initialisation and batch order follow the seed; its
    last step is scored;
  * reported per arm and size: macro-F1, balanced accuracy and accuracy,
    mean and 95 % t-interval over seeds, and the per-seed paired difference
    to 'real' at the same n (same real images, same init seed).

What the synthetic arms can and cannot show: the generators were trained on
the whole labelled train split, so an augmented arm receives, through the
generator, information from more labels than its n real images; the
real-only arm at the largest n (or `all`) is the reference for what those
labels are worth directly.

Generators come from training workdirs (`config.generators`: name ->
workdir, restored with `config.generator_configs[name]`), or are passed in
memory.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import numpy as np

from matplotlib.figure import Figure  # Agg canvas, no pyplot state

from medgen_jax import classifier
from medgen_jax import data as data_lib
from medgen_jax.data.info import DatasetInfo
from medgen_jax.studies import classification as cls_lib
from medgen_jax.eval import reference
from medgen_jax.inference import sample

GenerateFn = Callable[[Mapping[str, np.ndarray], int], np.ndarray]


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


def check_generator_configs(config: Any, generators=None) -> None:
  """The generator arms are named and configured for the classifier's data."""
  names = set(generators if generators is not None else config.generators)
  reserved = {"real", "source", "target_labelled"} & names
  if reserved:
    raise ValueError(f"generator names {sorted(reserved)} are reserved for the real arms")
  if generators is not None:
    return
  missing = sorted(set(config.generators) - set(config.generator_configs))
  if missing:
    raise ValueError(f"config.generator_configs lacks {missing}")
  for name, gc in config.generator_configs.items():
    d, c = gc.data, config.data
    if (d.name != c.name or d.image_size != c.image_size or d.mode != c.mode
        or tuple(d.modalities) != tuple(c.modalities)):
      raise ValueError(f"generator {name!r} is configured for other data "
                       f"({d.name}, {d.image_size}, {d.modalities}, {d.mode}) than the "
                       f"classifier ({c.name}, {c.image_size}, {c.modalities}, {c.mode})")


def check_config(config: Any, info: DatasetInfo, generators=None) -> cls_lib.ClassTask:
  """One ValueError for a bad experiment config, before anything is trained."""
  return _checked(config, info, generators)[0]


def _checked(config: Any, info: DatasetInfo, generators
             ) -> tuple[cls_lib.ClassTask, dict[str, np.ndarray]]:
  """`check_config`, returning the task and the train split it loaded to
  count the labelled examples (so a run reads it once)."""
  task = cls_lib.class_task(info, config.field, tuple(config.classes))
  sizes = [int(n) for n in config.num_real]
  if not sizes or min(sizes) < task.num_classes or sizes != sorted(set(sizes)):
    raise ValueError(f"config.num_real {sizes} must be increasing sizes >= the number "
                     f"of classes {task.num_classes}")
  ratios = [float(r) for r in config.synthetic_ratios]
  if not ratios or min(ratios) <= 0:
    raise ValueError(f"config.synthetic_ratios {ratios} must be positive")
  if len(config.seeds) < 2:
    raise ValueError(f"need >= 2 seeds for an interval, got {list(config.seeds)}")
  if not config.test_splits:
    raise ValueError("config.test_splits is empty")
  check_generator_configs(config, generators)
  train = load_task_split(config.data, task, ("train",))
  if len(train["label"]) < sizes[-1]:
    raise ValueError(f"the train split has {len(train['label'])} labelled examples of "
                     f"classes {list(task.task_field.class_names)}, fewer than num_real "
                     f"{sizes[-1]}")
  return task, train


def load_task_split(data_config: Any, task: cls_lib.ClassTask, splits) -> dict[str, np.ndarray]:
  """The examples of `splits` (concatenated) whose class is in the task, with
  `label` = task label; every other array (conditions, images) kept."""
  parts = [data_lib.load_arrays(data_config, split=s) for s in splits]
  arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  label = task.to_task(arrays[task.field.name])
  keep = label >= 0
  out = {k: v[keep] for k, v in arrays.items()}
  out["label"] = label[keep]
  return out


def synthetic_set(generate: GenerateFn, task: cls_lib.ClassTask, info: DatasetInfo,
                  rows: Mapping[str, np.ndarray], num: int, *, seed: int,
                  fixed: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
  """`num` generated images: classes cycling over the task (balanced prefixes),
  other conditions copied from random `rows`, `fixed` fields set as given.

  Returns:
    {'image': `[num, *image_shape]`, 'label': task labels, and the requested
    conditions}.

  Raises:
    ValueError: the generator returned the wrong shape.
  """
  cond = reference.draw_conditions(rows, info, num, seed=seed)
  cond[task.field.name] = cls_lib.nested_balanced(task, num)
  for name, value in (fixed or {}).items():
    cond[name] = np.full(num, value, cond[name].dtype)
  images = np.asarray(generate(cond, seed), np.float32)
  if images.shape != (num, *info.image_shape):
    raise ValueError(f"a generator returned {images.shape}, expected "
                     f"{(num, *info.image_shape)}")
  return {"image": images, "label": task.to_task(cond[task.field.name]), **cond}


def arm_name(generator: str, ratio: float) -> str:
  return f"{generator} x{ratio:g}"


def run_downstream(config: Any, workdir: str, *,
                   generators: Mapping[str, GenerateFn] | None = None) -> dict[str, Any]:
  """Runs the learning-curve augmentation experiment (module docstring).

  Args:
    config: see `configs/downstream_lesion.py`.
    workdir: output directory (results.json, learning_curves.png).
    generators: optional {name: generate(conditions, seed) -> images
      `[n, *spatial, C]` in [-1, 1]} instead of `config.generators`.

  Returns:
    the results dict written to `workdir/results.json`.
  """
  info = data_lib.load_info(config.data)
  task, train = _checked(config, info, generators)
  sizes = [int(n) for n in config.num_real]
  ratios = [float(r) for r in config.synthetic_ratios]
  known = np.arange(len(train["label"]))
  test = load_task_split(config.data, task, tuple(config.test_splits))
  tests = {"test": {"image": test["image"], "label": test["label"]}}
  if generators is None:
    generators = checkpoint_generators(config, info)
  arms = ["real"] + [arm_name(g, r) for g in generators for r in ratios]
  runs: list[dict[str, Any]] = []
  recipe = classifier.from_section(config.classifier)
  for seed in (int(s) for s in config.seeds):
    order = np.random.default_rng(seed).permutation(known)
    synthetic = {g: synthetic_set(fn, task, info, train, int(round(ratios[-1] * sizes[-1])),
                                  seed=seed)
                 for g, fn in generators.items()} if generators else {}
    for n in sizes:
      real = order[:n]
      sets = {"real": (train["image"][real], train["label"][real])}
      for g in generators:
        for r in ratios:
          m = int(round(r * n))
          sets[arm_name(g, r)] = (
              np.concatenate([train["image"][real], synthetic[g]["image"][:m]]),
              np.concatenate([train["label"][real], synthetic[g]["label"][:m]]))
      for arm, (images, labels) in sets.items():
        result = cls_lib.train_and_test(images, labels, task, tests, recipe, seed)
        runs.append({"seed": seed, "num_real": n, "arm": arm, **result["test"]})

  def select(arm, n):
    return [r for r in runs if r["arm"] == arm and r["num_real"] == n]

  results: dict[str, Any] = {
      "protocol": protocol(config, task, len(test["label"]), np.bincount(
          test["label"], minlength=task.num_classes)),
      "curves": {arm: {str(n): cls_lib.summarise(select(arm, n),
                                                 None if arm == "real" else select("real", n))
                       for n in sizes} for arm in arms},
      "runs": runs}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as fh:
    json.dump(results, fh, indent=2)
  results["figure"] = save_learning_curves(os.path.join(workdir, "learning_curves.png"),
                                           results)
  return results


def protocol(config: Any, task: cls_lib.ClassTask, num_test: int, test_counts
             ) -> dict[str, Any]:
  """The experiment's settings as JSON-able facts (stored with the results)."""
  c = config
  return {
      "dataset": c.data.name, "image_size": int(c.data.image_size), "mode": c.data.mode,
      "field": task.field.name, "classes": list(task.task_field.class_names),
      "chance_macro_f1_balanced_accuracy": 1.0 / task.num_classes,
      "num_real": [int(n) for n in c.num_real],
      "synthetic_ratios": [float(r) for r in c.synthetic_ratios],
      "seeds": [int(s) for s in c.seeds], "num_test": int(num_test),
      "test_class_counts": [int(x) for x in test_counts],
      "test_splits": list(c.test_splits),
      "classifier": {k: (list(v) if isinstance(v, (tuple, list)) else v)
                     for k, v in dict(c.classifier).items()},
      "checkpoint_selection": "none: the classifier's last step is scored",
      "synthetic_conditions": "task classes cycled (balanced prefixes); other fields "
                              "copied from random train rows; noise seed = seed",
      "generators": {k: str(v) for k, v in dict(c.generators).items()},
      "interval": "95% Student-t over seeds; paired difference = arm - real, same seed",
  }


def save_learning_curves(path: str, results: Mapping[str, Any]) -> str:
  """Macro-F1 and balanced accuracy against the number of real images, one
  line per arm with its 95 % interval as a band; chance dashed."""
  metrics = ("macro_f1", "balanced_accuracy")
  fig = Figure(figsize=(9.0, 3.6))
  axes = fig.subplots(1, len(metrics))
  sizes = [int(n) for n in results["protocol"]["num_real"]]
  for ax, metric in zip(axes, metrics):
    for arm, curve in results["curves"].items():
      mean = [curve[str(n)][metric]["mean"] for n in sizes]
      lo = [curve[str(n)][metric]["ci_low"] for n in sizes]
      hi = [curve[str(n)][metric]["ci_high"] for n in sizes]
      ax.plot(sizes, mean, "o-", label=arm, markersize=3)
      ax.fill_between(sizes, lo, hi, alpha=0.15)
    ax.axhline(results["protocol"]["chance_macro_f1_balanced_accuracy"], color="k",
               ls="--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("real labelled training images")
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
  n = len(results["protocol"]["seeds"])
  fig.suptitle(f"{results['protocol']['field']} "
               f"({' / '.join(results['protocol']['classes'])}) on held-out subjects, "
               f"{n} seeds, 95% t-intervals", fontsize=9)
  axes[-1].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  return path
