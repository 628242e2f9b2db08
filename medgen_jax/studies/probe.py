"""How well can an extractor architecture, or the evaluation's judge, read
each condition from real images?

`probe_extractor` trains `medgen_jax.classifier`'s `FeatureNet` on a dataset's real train split
and scores it on the real test split (other subjects) with the same
`fidelity.condition_fidelity` the evaluation applies to generated images.
That accuracy is the ceiling of every condition-fidelity number: a classifier
at chance on real data cannot judge whether generated images follow a
condition. Cheaper than a full evaluation, so architectures can be compared.

`probe_judge` reads the real test split with a config's own judge
(`config.judge`, trained on first use and cached): the numbers every
evaluation report carries as `judge_*_real_reference`, without a run.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from medgen_jax import data as data_lib
from medgen_jax.classifier import judge as judge_lib
from medgen_jax.classifier import training
from medgen_jax.metrics import fidelity


def probe_extractor(data_config: Any, *, fields: Sequence[str] | None = None,
                    steps: int, batch_size: int = 64, seed: int = 0,
                    lr: float = 1e-3, **architecture) -> dict[str, Any]:
  """Trains on real train images, scores on real test images.

  Args:
    data_config: the dataset config.
    fields: condition names to train and score (None: all).
    steps, batch_size, seed, lr: extractor training settings.
    **architecture: `training.make_extractor` keywords.

  Returns:
    {'steps', 'train_s', 'architecture', 'num_train', 'num_test'} plus the
    `condition_fidelity` scores ('<field>_accuracy', per-class
    '<field>_accuracy_<class>', '<field>_chance', '<field>_mae').
  """
  info = data_lib.load_info(data_config)
  chosen = (tuple(info.conditions) if fields is None
            else tuple(info.condition(name) for name in fields))
  if not chosen:
    raise ValueError(f"dataset {info.name!r} has no condition fields to probe")
  training.make_extractor(chosen, **architecture)  # bad settings fail here
  train = data_lib.load_arrays(data_config, split="train")
  test = data_lib.load_arrays(data_config, split="test")
  start = time.perf_counter()
  model, params, _ = training.train_feature_extractor(
      train["image"], {f.name: train[f.name] for f in chosen}, chosen,
      steps=steps, batch_size=batch_size, seed=seed, lr=lr, **architecture)
  train_s = time.perf_counter() - start
  scores = _read_test_split(model, params, test, chosen)
  return {"steps": int(steps), "train_s": round(train_s, 1),
          "architecture": {k: getattr(model, k) for k in training.ARCHITECTURE_KEYS},
          "num_train": int(len(train["image"])), "num_test": int(len(test["image"])),
          **scores}


def probe_judge(config: Any) -> dict[str, Any]:
  """The judge of a generation config (`config.judge`) on the real test split.

  Returns:
    {'judge_kind', 'judge_path', 'judge_reused', 'train_s' (0 when reused),
    'num_test'} plus the `condition_fidelity` scores of its readings.

  Raises:
    ValueError: the config has no judge section or the dataset no conditions.
  """
  if config.get("judge") is None:
    raise ValueError("the config has no judge section (config.judge)")
  info = data_lib.load_info(config.data)
  if not info.conditions:
    raise ValueError(f"dataset {info.name!r} has no condition fields to judge")
  start = time.perf_counter()  # get_judge checks its section before any render
  judge = judge_lib.get_judge(config.judge, config.data, info)
  train_s = 0.0 if judge.meta["reused"] else time.perf_counter() - start
  test = data_lib.load_arrays(config.data, split="test")
  scores = _read_test_split(judge.model, judge.params, test, info.conditions)
  return {"judge_kind": judge.kind, "judge_path": judge.meta["path"],
          "judge_reused": bool(judge.meta["reused"]), "train_s": round(train_s, 1),
          "num_test": int(len(test["image"])), **scores}


def _read_test_split(model, params, test: dict, fields) -> dict[str, float]:
  """`condition_fidelity` of a classifier's readings of the real test split's
  images against their stored `fields`."""
  predicted = training.predict_conditions(model, params, test["image"])
  return fidelity.condition_fidelity(
      predicted, {f.name: test[f.name] for f in fields}, fields)
