"""The real reference of an evaluation: its splits, the domain extractor and
the conditions drawn from them."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from medgen_jax import data as data_lib
from medgen_jax.classifier import cache
from medgen_jax.data.info import CATEGORICAL, DatasetInfo
from medgen_jax.eval import settings as settings_lib


def load_real(data_config: Any, settings: Mapping[str, Any]
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(train, test) split arrays, capped at `max_train` / `max_test` images."""
  train = data_lib.load_arrays(data_config, split="train",
                               max_examples=settings["max_train"])
  test = data_lib.load_arrays(data_config, split="test",
                              max_examples=settings["max_test"])
  return train, test


def draw_conditions(reference: Mapping[str, np.ndarray], info: DatasetInfo,
                    num: int, *, seed: int) -> dict[str, np.ndarray]:
  """`num` condition tuples drawn from the rows of a real split.

  Whole rows are drawn (so correlations between fields are kept): a random
  permutation of all rows, repeated as often as needed, then truncated. With
  `num` equal to the split size the requested conditions are exactly the
  split's conditions, so class balance matches the reference exactly.

  Returns:
    {field: `[num]`} int32 categorical / float32 continuous; {} for a
    dataset without conditions.
  """
  if not info.conditions:  # an unconditional model: nothing to request
    return {}
  n = len(np.asarray(reference[info.conditions[0].name]))
  if n < 1:
    raise ValueError("draw_conditions needs a split with condition fields")
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(n) for _ in range(-(-num // n))])[:num]
  return {f.name: np.asarray(reference[f.name])[order].astype(
      np.int32 if f.kind == CATEGORICAL else np.float32) for f in info.conditions}


@dataclasses.dataclass(frozen=True)
class Reference:
  """What every generated set of one evaluation is scored against and asked for.

  Attributes:
    info: the dataset's DatasetInfo.
    train, test: real split arrays (`load_real`).
    model, params: the domain feature extractor.
    extractor_meta: `classifier.get_classifier`'s {'path', 'reused', ...}.
    num_samples: how many images to generate.
    requested: {field: `[num_samples]`} conditions to generate them for
      (`draw_conditions`); {} for an unconditional model.
  """
  info: DatasetInfo
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  model: Any
  params: Any
  extractor_meta: dict[str, Any]
  num_samples: int
  requested: dict[str, np.ndarray]


def load_reference(config: Any, settings: Mapping[str, Any]) -> Reference:
  """Loads the real splits and the extractor and draws the requested conditions.

  `settings` are `eval.settings.eval_settings(config)`: `num_samples` (None:
  the test split's size) conditions are drawn with `seed`, so every
  generator scored on one Reference gets the same requests.
  """
  info = data_lib.load_info(config.data)
  train, test = load_real(config.data, settings)
  model, params, meta = cache.get_classifier(
      settings_lib.extractor_recipe(settings), config.data, info, train=train,
      path=settings["extractor_path"])
  num = int(settings["num_samples"] or len(test["image"]))
  requested = draw_conditions(test, info, num, seed=int(settings["seed"]))
  return Reference(info, train, test, model, params, meta, num, requested)
