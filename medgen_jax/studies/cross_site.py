"""The cross-site experiment: can synthetic slices stand in for an unlabelled hospital?

Scenario: labelled scans from the source sites; scans from a target site
without labels. The generator is trained on every site's images with the
target site's labels of `config.field` hidden (`data.hide_labels`, checked
here), so no target label reaches the classifier through it.

Protocol (`run_cross_site`), fixed before any test result is seen and stored
in results.json, per seed:

  * `num_real` labelled examples drawn from the source sites' train subjects
    (the task's classes only, see `studies.classification`);
  * arms, all with the same real examples, init seed and classifier recipe:
      - 'source': the source examples alone;
      - '<generator>@target': + `num_synthetic` generated examples requested
        for the target site, classes balanced, other conditions copied from
        random source rows;
      - '<generator>@source': + as many generated examples requested for the
        source sites (drawn from the real examples' site mix): the control
        that separates "more images" from "images that look like the target";
      - 'target_labelled' (reference, uses target labels): + `num_synthetic`
        real labelled examples of the target site's train subjects;
  * tests: held-out subjects (`config.test_splits`) of the target site (the
    primary test) and of the source sites (in-domain);
  * reported: macro-F1, balanced accuracy and accuracy, mean and 95 %
    t-interval over seeds, paired differences to 'source', and the gap
    closed = mean paired difference of an arm / that of 'target_labelled'.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from matplotlib.figure import Figure  # Agg canvas, no pyplot state

from medgen_jax import classifier
from medgen_jax import data as data_lib
from medgen_jax.data import hidden_labels
from medgen_jax.data.info import CATEGORICAL, DatasetInfo
from medgen_jax.studies import classification as cls_lib
from medgen_jax.studies import downstream

TESTS = ("target", "source")


def target_site(config: Any, info: DatasetInfo) -> int:
  """The target site's class index (`config.target_site`: a name or index)."""
  f = info.condition(config.site_field)
  if f.kind != CATEGORICAL:
    raise ValueError(f"config.site_field {config.site_field!r} must be categorical")
  return int(f.parse(str(config.target_site)))


def check_config(config: Any, info: DatasetInfo, generators=None) -> cls_lib.ClassTask:
  """One ValueError for a bad experiment config, before anything is trained.

  A generator from a workdir must have been trained with the target site's
  labels of `field` hidden; otherwise the 'unlabelled target' arm would
  learn from target labels through the generator.
  """
  return _checked(config, info, generators)[0]


def _checked(config: Any, info: DatasetInfo, generators) -> tuple[cls_lib.ClassTask, int, tuple]:
  """`check_config`, returning the task, the target site's index and the
  `site_pools` it loaded to check the data (so a run reads them once)."""
  task = cls_lib.class_task(info, config.field, tuple(config.classes))
  site = target_site(config, info)
  if config.site_field == config.field:
    raise ValueError("config.site_field must differ from config.field")
  if int(config.num_real) < task.num_classes or int(config.num_synthetic) < 1:
    raise ValueError(f"num_real {config.num_real} must be >= {task.num_classes} and "
                     f"num_synthetic {config.num_synthetic} >= 1")
  if len(config.seeds) < 2:
    raise ValueError(f"need >= 2 seeds for an interval, got {list(config.seeds)}")
  downstream.check_generator_configs(config, generators)
  if generators is None:
    wanted = hidden_labels.HiddenLabel(config.field, config.site_field, site)
    for name, gc in config.generator_configs.items():
      rules = hidden_labels.parse_hidden_labels(gc.data.get("hide_labels"), info)
      if wanted not in rules:
        raise ValueError(
            f"generator {name!r} must be trained without the target site's labels: set "
            f"its data.hide_labels to '{config.field}:{config.site_field}="
            f"{config.target_site}' (it is {gc.data.get('hide_labels')!r})")
  # The data must hold what the config asks for.
  return task, site, site_pools(config, task, site)


def site_pools(config: Any, task: cls_lib.ClassTask, site: int
               ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray,
                          dict[str, dict[str, np.ndarray]]]:
  """(train arrays, source-site indices, target-site indices, held-out tests).

  Raises:
    ValueError: fewer source examples than `num_real`, fewer target examples
      than `num_synthetic` (the labelled reference arm draws that many), or
      no held-out example at the target or the source sites.
  """
  name = config.site_field
  train = downstream.load_task_split(config.data, task, ("train",))
  held_out = downstream.load_task_split(config.data, task, tuple(config.test_splits))
  source_pool = np.flatnonzero(train[name] != site)
  target_pool = np.flatnonzero(train[name] == site)
  for what, pool, need in (("source-site", source_pool, config.num_real),
                           ("target-site", target_pool, config.num_synthetic)):
    if len(pool) < int(need):
      raise ValueError(f"the train split has {len(pool)} labelled {what} examples of "
                       f"classes {list(task.task_field.class_names)}, fewer than the "
                       f"{need} the config asks for")
  tests = {t: {"image": held_out["image"][keep], "label": held_out["label"][keep]}
           for t, keep in (("target", held_out[name] == site),
                           ("source", held_out[name] != site))}
  for t, arrays in tests.items():
    if len(arrays["label"]) == 0:
      raise ValueError(f"the held-out splits {list(config.test_splits)} have no {t}-site "
                       f"examples of the task's classes")
  return train, source_pool, target_pool, tests


def run_cross_site(config: Any, workdir: str, *,
                   generators: Mapping[str, downstream.GenerateFn] | None = None
                   ) -> dict[str, Any]:
  """Runs the cross-site experiment (module docstring).

  Args:
    config: see `configs/downstream_cross_site.py`.
    workdir: output directory (results.json, cross_site.png).
    generators: optional {name: generate(conditions, seed) -> images} instead
      of `config.generators`.

  Returns:
    the results dict written to `workdir/results.json`.
  """
  info = data_lib.load_info(config.data)
  task, site, (train, source_pool, target_pool, tests) = _checked(config, info, generators)
  site_name = config.site_field
  if generators is None:
    generators = downstream.checkpoint_generators(config, info)
  m = int(config.num_synthetic)
  runs: list[dict[str, Any]] = []
  recipe = classifier.from_section(config.classifier)
  for seed in (int(s) for s in config.seeds):
    rng = np.random.default_rng(seed)
    real = rng.choice(source_pool, int(config.num_real), replace=False)
    source_rows = {k: v[real] for k, v in train.items()}
    labelled = rng.choice(target_pool, m, replace=False)
    extra = {"target_labelled": {k: v[labelled] for k, v in train.items()}}
    for g, fn in generators.items():
      extra[f"{g}@target"] = downstream.synthetic_set(fn, task, info, source_rows, m,
                                                      seed=seed, fixed={site_name: site})
      extra[f"{g}@source"] = downstream.synthetic_set(fn, task, info, source_rows, m,
                                                      seed=seed + 7919)
    sets = {"source": (source_rows["image"], source_rows["label"])}
    for arm, e in extra.items():
      sets[arm] = (np.concatenate([source_rows["image"], e["image"]]),
                   np.concatenate([source_rows["label"], e["label"]]))
    for arm, (images, labels) in sets.items():
      result = cls_lib.train_and_test(images, labels, task, tests, recipe, seed)
      runs.append({"seed": seed, "arm": arm, **{t: result[t] for t in TESTS}})

  arms = list(dict.fromkeys(r["arm"] for r in runs))
  per = lambda arm, t: [r[t] for r in runs if r["arm"] == arm]
  summary = {arm: {t: cls_lib.summarise(per(arm, t), None if arm == "source"
                                        else per("source", t)) for t in TESTS}
             for arm in arms}
  oracle = summary["target_labelled"]["target"]["paired_difference"]
  for arm in arms:
    if arm not in ("source", "target_labelled"):
      gain = summary[arm]["target"]["paired_difference"]
      summary[arm]["target"]["gap_closed"] = {
          metric: (gain[metric]["mean"] / oracle[metric]["mean"]
                   if oracle[metric]["mean"] > 0 else float("nan"))
          for metric in cls_lib.METRICS}
  results = {"protocol": protocol(config, task, info, tests), "arms": summary,
             "runs": runs}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as fh:
    json.dump(results, fh, indent=2)
  results["figure"] = save_site_bars(os.path.join(workdir, "cross_site.png"), results)
  return results


def protocol(config: Any, task: cls_lib.ClassTask, info: DatasetInfo,
             tests: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
  """The experiment's settings as JSON-able facts (stored with the results)."""
  c = config
  site_field = info.condition(c.site_field)
  site = target_site(c, info)
  return {
      "dataset": c.data.name, "image_size": int(c.data.image_size), "mode": c.data.mode,
      "field": task.field.name, "classes": list(task.task_field.class_names),
      "chance_macro_f1_balanced_accuracy": 1.0 / task.num_classes,
      "site_field": c.site_field,
      "target_site": site_field.class_names[site] if site_field.class_names else site,
      "num_real": int(c.num_real), "num_synthetic": int(c.num_synthetic),
      "seeds": [int(s) for s in c.seeds], "test_splits": list(c.test_splits),
      "num_test": {t: int(len(v["label"])) for t, v in tests.items()},
      "classifier": {k: (list(v) if isinstance(v, (tuple, list)) else v)
                     for k, v in dict(c.classifier).items()},
      "checkpoint_selection": "none: the classifier's last step is scored",
      "generators": {k: str(v) for k, v in dict(c.generators).items()},
      "interval": "95% Student-t over seeds; paired difference = arm - source, same seed",
      "gap_closed": "mean paired difference of the arm / that of target_labelled "
                    "(on the target test)",
  }


def save_site_bars(path: str, results: Mapping[str, Any]) -> str:
  """Per test site group, macro-F1 and balanced accuracy per arm: bars with
  95 % intervals, seed dots, chance dashed."""
  arms = list(results["arms"])
  metrics = ("macro_f1", "balanced_accuracy")
  fig = Figure(figsize=(4.0 + 1.2 * len(arms), 3.4))
  axes = fig.subplots(1, len(TESTS))
  width = 0.8 / len(arms)
  for ax, t in zip(axes, TESTS):
    for i, arm in enumerate(arms):
      xs = np.arange(len(metrics)) + (i - (len(arms) - 1) / 2) * width
      entry = results["arms"][arm][t]
      means = np.array([entry[m]["mean"] for m in metrics])
      err = np.array([[entry[m]["mean"] - entry[m]["ci_low"],
                       entry[m]["ci_high"] - entry[m]["mean"]] for m in metrics]).T
      ax.bar(xs, means, width, yerr=np.nan_to_num(err), capsize=3, label=arm)
      for x, m in zip(xs, metrics):
        ax.plot([x] * len(entry[m]["values"]), entry[m]["values"], "k.", markersize=3)
    ax.axhline(results["protocol"]["chance_macro_f1_balanced_accuracy"], color="k",
               ls="--", lw=0.8)
    ax.set_xticks(np.arange(len(metrics)), metrics)
    ax.set_ylim(0, 1)
    ax.set_title("held-out subjects, " + ("source sites" if t == "source" else
                 f"target site ({results['protocol']['target_site']})"), fontsize=9)
  axes[-1].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  return path
