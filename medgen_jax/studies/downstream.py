"""The augmentation experiment: do synthetic images help a small-data classifier?

Protocol (`run_downstream`), fixed before any test result is seen and stored
in results.json:

  * task: `config.field` over `config.classes` (e.g. lesion none vs large);
    examples of other classes are left out everywhere;
  * test set: every example of the held-out splits `config.test_splits`
    (subjects never seen by the classifier nor by the generators, which are
    trained on the train split); no split is used to select anything;
  * which labels a generator sees (`config.labels_seen`):
    - 'per_size' (leak-free): the real set of size n is fixed, the first n
      of a permutation (`config.label_seed`) of the labelled train examples
      (`data.hidden_labels.keep_indices`; nested in n), and each generator
      is trained once per n with `data.hide_labels` keeping exactly those n
      labels of `config.field` (`hidden_labels.keep_rule`): it, its teacher
      and its selector see the other train images without that label (a
      semi-supervised arm, stated in the protocol). The seeds vary the
      classifier's initialisation and batch order and the noise;
    - 'all': every seed draws its own real set (its own permutation) and the
      generators were trained on the whole labelled train split, so an
      augmented arm receives, through the generator, information from more
      labels than its n real images;
    results.json records `generator_labels_seen` for each synthetic arm and n;
  * arm 'real' trains on the real set alone. For each generator (and n, when
    per size), one synthetic set per seed (noise seed = seed) of the largest
    size needed, its requested classes cycling over the task's classes
    (every prefix is balanced) and its other conditions copied from random
    rows of the train split; arm '<generator> x<r>' trains on the n real
    images plus the first round(r * n) synthetic ones, labelled with the
    requested class, batches drawn uniformly from the union;
  * the classifier (`studies.classification`) has one fixed recipe for every
    arm and size; its initialisation and batch order follow the seed; its
    last step is scored;
  * reported per arm and size: macro-F1, balanced accuracy and accuracy,
    mean and 95 % t-interval over seeds, and the per-seed paired difference
    to 'real' at the same n (same real images, same init seed).

Generators come from training workdirs (`generator_runs`: per name the
workdir `config.generators[name]`, with '_n<n>' per size under 'per_size',
restored with `config.generator_configs[name]` and the size's label rule),
or are passed in memory (one generate function per name, or per name a
{n: generate function}; their labels seen are not known and recorded as
null).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from matplotlib.figure import Figure  # Agg canvas, no pyplot state

from medgen_jax import classifier
from medgen_jax import data as data_lib
from medgen_jax.data import hidden_labels
from medgen_jax.data.info import DatasetInfo
from medgen_jax.studies import classification as cls_lib
from medgen_jax.eval import reference
from medgen_jax.inference import sample

GenerateFn = Callable[[Mapping[str, np.ndarray], int], np.ndarray]


LABELS_SEEN = ("per_size", "all")


def per_size(config: Any) -> bool:
  """Whether each generator is trained per real-set size (the leak-free protocol)."""
  return config.experiment == "augmentation" and config.labels_seen == "per_size"


def label_rule(config: Any, n: int) -> str:
  """The `data.hide_labels` rule of the generator for real-set size `n`."""
  return hidden_labels.keep_rule(config.field, n, config.label_seed, config.classes)


def generator_runs(config: Any) -> dict[tuple[str, int | None], tuple[str, Any]]:
  """(name, n or None) -> (workdir, training config) of every generator the
  experiment uses: one per name, or one per name and real-set size under
  `labels_seen='per_size'` (workdir '<generators[name]>_n<n>', its config
  `generator_configs[name]` keeping the labels of that size's real set)."""
  runs = {}
  for name, workdir in config.generators.items():
    if not per_size(config):
      runs[(name, None)] = (workdir, config.generator_configs[name])
      continue
    for n in (int(n) for n in config.num_real):
      gc = ml_collections.ConfigDict(config.generator_configs[name].to_dict())
      gc.data.hide_labels = label_rule(config, n)
      runs[(name, n)] = (f"{workdir}_n{n}", gc)
  return runs


def checkpoint_generators(config: Any, info: DatasetInfo
                          ) -> dict[str, GenerateFn | dict[int, GenerateFn]]:
  """Generate functions of `generator_runs`: the latest fp32 EMA generator of
  each, per name (or per name a {n: function} under 'per_size').

  Raises:
    FileNotFoundError: a workdir holds no checkpoint.
  """
  out: dict[str, Any] = {}
  for (name, n), (workdir, gc) in generator_runs(config).items():
    fn, _ = sample.generator_fn(gc, workdir, info, precision="fp32")
    if n is None:
      out[name] = fn
    else:
      out.setdefault(name, {})[n] = fn
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
    if per_size(config) and gc.data.hide_labels:
      raise ValueError(f"generator {name!r} sets data.hide_labels "
                       f"{gc.data.hide_labels!r}; under labels_seen='per_size' the "
                       f"experiment sets it per real-set size")
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
  if config.labels_seen not in LABELS_SEEN:
    raise ValueError(f"config.labels_seen must be one of {LABELS_SEEN}, got "
                     f"{config.labels_seen!r}")
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
  test = load_task_split(config.data, task, tuple(config.test_splits))
  tests = {"test": {"image": test["image"], "label": test["label"]}}
  labels_seen = {}
  if generators is None:
    generators = checkpoint_generators(config, info)
    labels_seen = {g: {n: (n if per_size(config) else len(train["label"])) for n in sizes}
                   for g in generators}
  per_n = {g: (fns if isinstance(fns, Mapping) else {n: fns for n in sizes})
           for g, fns in generators.items()}
  # Each distinct generate function draws one set per seed, of the largest size
  # it serves; the smaller arms are its prefixes.
  largest = {}
  for fns in per_n.values():
    for n in sizes:
      largest[fns[n]] = max(largest.get(fns[n], n), n)
  runs: list[dict[str, Any]] = []
  recipe = classifier.from_section(config.classifier)
  for seed in (int(s) for s in config.seeds):
    order = real_order(config, task, train, seed)
    synthetic = {fn: synthetic_set(fn, task, info, train, int(round(ratios[-1] * n)),
                                   seed=seed)
                 for fn, n in largest.items()}
    for n in sizes:
      real = order[:n]
      sets = {"real": (train["image"][real], train["label"][real])}
      for g, fns in per_n.items():
        fake = synthetic[fns[n]]
        for r in ratios:
          m = int(round(r * n))
          sets[arm_name(g, r)] = (np.concatenate([train["image"][real], fake["image"][:m]]),
                                  np.concatenate([train["label"][real], fake["label"][:m]]))
      for arm, (images, labels) in sets.items():
        result = cls_lib.train_and_test(images, labels, task, tests, recipe, seed)
        runs.append({"seed": seed, "num_real": n, "arm": arm, **result["test"]})

  def select(arm, n):
    return [r for r in runs if r["arm"] == arm and r["num_real"] == n]

  def curve(arm, g, n):
    out = cls_lib.summarise(select(arm, n), None if g is None else select("real", n))
    if g is not None:
      out["generator_labels_seen"] = labels_seen.get(g, {}).get(n)
    return out

  results: dict[str, Any] = {
      "protocol": protocol(config, task, len(test["label"]), np.bincount(
          test["label"], minlength=task.num_classes)),
      "curves": {"real": {str(n): curve("real", None, n) for n in sizes},
                 **{arm_name(g, r): {str(n): curve(arm_name(g, r), g, n) for n in sizes}
                    for g in generators for r in ratios}},
      "runs": runs}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as fh:
    json.dump(results, fh, indent=2)
  results["figure"] = save_learning_curves(os.path.join(workdir, "learning_curves.png"),
                                           results)
  return results


def real_order(config: Any, task: cls_lib.ClassTask, train: Mapping[str, np.ndarray],
               seed: int) -> np.ndarray:
  """Positions in the task's train arrays, the real set of size n being the
  first n: under 'per_size' the generators' kept labels (`label_seed`, the
  same for every seed), else a permutation drawn with `seed`."""
  n = len(train["label"])
  if per_size(config):
    rule = hidden_labels.KeepLabels(task.field.name, n, int(config.label_seed),
                                    tuple(task.kept))
    return hidden_labels.keep_indices(train[task.field.name], rule)
  return np.random.default_rng(seed).permutation(n)


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
      "labels_seen": c.labels_seen,
      "generator_labels": (
          f"per size n: the labels of {task.field.name} of the n real images only "
          f"(data.hide_labels '{label_rule(c, 0).replace('keep=0', 'keep=n')}'); the "
          f"other train images without them (semi-supervised)" if per_size(c) else
          f"every labelled train image's {task.field.name} label"),
      "label_seed": int(c.label_seed) if per_size(c) else None,
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
