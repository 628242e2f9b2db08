"""The evaluation judge: reads the conditions of generated images.

It is a condition classifier kept apart from everything that shapes the
samples (the training teacher, the best-of-K selector): its own recipe
(`config.judge`), its own seed, and, where the data is the ct_phantom
renderer, its own data: `judge.subjects` fresh subjects rendered outside
every split (`data.render_fresh_arrays`), as many labelled images as it
needs. On a researcher's own folder (or with `judge.subjects = 0`) it is
trained on the real train split and reported as such (`Judge.kind`).
Trained once and cached like every classifier (`cache.get_classifier`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from medgen_jax import data as data_lib
from medgen_jax.classifier import cache
from medgen_jax.classifier.network import FeatureNet
from medgen_jax.classifier.recipe import Recipe, from_section
from medgen_jax.data.info import DatasetInfo

FRESH_RENDERS = "fresh_renders"
TRAIN_SPLIT = "train_split"


@dataclasses.dataclass(frozen=True)
class Judge:
  """A trained judge.

  Attributes:
    model, params: the classifier (`classifier.predict_conditions`).
    kind: FRESH_RENDERS or TRAIN_SPLIT: what it was trained on.
    meta: `cache.get_classifier`'s metadata ('path', 'reused', ...).
  """
  model: FeatureNet
  params: Any
  kind: str
  meta: dict


def judge_recipe(section: Any) -> tuple[Recipe, int]:
  """(recipe, fresh subjects) of a `config.judge` section.

  Raises:
    ValueError: a bad recipe value or `subjects` < 0.
  """
  subjects = int(section["subjects"])
  if subjects < 0:
    raise ValueError(f"judge.subjects must be >= 0 (0 = the real train split), got "
                     f"{section['subjects']}")
  return from_section(section), subjects


def judge_kind(section: Any, data_config: Any) -> str:
  """What the judge of `section` is trained on for `data_config`."""
  _, subjects = judge_recipe(section)
  return _kind(subjects, data_config)


def _kind(subjects: int, data_config: Any) -> str:
  return FRESH_RENDERS if subjects and data_config.name == "ct_phantom" else TRAIN_SPLIT


def get_judge(section: Any, data_config: Any, info: DatasetInfo) -> Judge:
  """The cached judge of `section` for `data_config`, trained on first use."""
  recipe, subjects = judge_recipe(section)
  kind = _kind(subjects, data_config)
  if kind == FRESH_RENDERS:
    source = {"kind": FRESH_RENDERS, "subjects": subjects}
    train = lambda: data_lib.render_fresh_arrays(data_config, num_subjects=subjects)
    model, params, meta = cache.get_classifier(recipe, data_config, info, train=train,
                                               source=source)
  else:
    model, params, meta = cache.get_classifier(recipe, data_config, info)
  return Judge(model, params, kind, meta)
