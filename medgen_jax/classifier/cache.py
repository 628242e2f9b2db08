"""The on-disk cache of condition classifiers, one directory per dataset and recipe.

Every use (evaluation extractor, training teacher, best-of-K selector) is
trained once on the real train split and cached: `get_classifier` restores
it from a directory keyed by the dataset's identity and the `Recipe`, or
trains and saves it there. A dataset without conditions gets the label-free
rotation-pretext network (`training.train_pretext_extractor`; its key says
`objective`). The cache directory is written under a temporary name and
renamed when complete, so a process killed while saving leaves nothing that
looks like a classifier.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Mapping

import numpy as np

from medgen_jax import data as data_lib
from medgen_jax.classifier import training
from medgen_jax.classifier.network import FeatureNet
from medgen_jax.classifier.recipe import Recipe
from medgen_jax.data import builders
from medgen_jax.data.info import DatasetInfo

def _dataset_identity(data_config: Any, info: DatasetInfo) -> dict[str, Any]:
  summary = builders.build(data_config)
  return {"builder_dir": os.path.abspath(summary["builder_dir"]),
          "name": info.name, "image_shape": list(info.image_shape),
          "modalities": list(info.modalities),
          "intensity": [[t.modality, t.lo, t.hi] for t in info.intensity],
          "conditions": [f.name for f in info.conditions],
          # Hidden train labels change what a teacher learns; only a set rule
          # enters the key, so the caches of full-label runs keep their names.
          **({"hide_labels": data_config.get("hide_labels")}
             if data_config.get("hide_labels") else {})}


def select_fields(info: DatasetInfo, recipe: Recipe) -> DatasetInfo:
  """`info` with the conditions `recipe.fields` names only (all when empty).

  Raises:
    ValueError: a name that is not a condition of the dataset.
  """
  if not recipe.fields:
    return info
  known = [f.name for f in info.conditions]
  unknown = [n for n in recipe.fields if n not in known]
  if unknown:
    raise ValueError(f"classifier fields {unknown} are not conditions of the dataset "
                     f"{info.name!r} (it has {known})")
  return dataclasses.replace(
      info, conditions=tuple(f for f in info.conditions if f.name in recipe.fields))


def cache_key(data_config: Any, info: DatasetInfo, recipe: Recipe,
              source: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """What identifies a classifier: the dataset (built dir, channels, window,
  the conditions it reads), its recipe and, when it is not the real train
  split, what it was trained on (`source`). Stored beside it and compared on
  reuse."""
  info = select_fields(info, recipe)
  key = {"dataset": _dataset_identity(data_config, info), "training": recipe.cache_key()}
  if source:
    key["source"] = dict(source)
  if not info.conditions:  # (conditioned keys stay as they were: their caches still match)
    key["objective"] = "rotation_pretext"
  return key


def cache_path(data_config: Any, info: DatasetInfo, recipe: Recipe,
               path: str | os.PathLike | None = None,
               source: Mapping[str, Any] | None = None) -> str:
  """`path`, or `<data_dir>/medgen_extractors/<name>-<hash of cache_key>`.

  The default sits beside the datasets, so every run on the same dataset
  and recipe shares one classifier.
  """
  if path:
    return os.path.abspath(os.fspath(path))
  key = cache_key(data_config, info, recipe, source)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
  return os.path.join(builders.data_dir(data_config), "medgen_extractors",
                      f"{info.name}-{digest[:12]}")


def init_classifier(recipe: Recipe, info: DatasetInfo) -> tuple[FeatureNet, dict]:
  """An untrained classifier of `recipe` for `info`'s images (no data is read)."""
  info = select_fields(info, recipe)
  return training.init_extractor(info.conditions, info.image_shape, seed=recipe.seed,
                                 **recipe.architecture)


def get_classifier(recipe: Recipe, data_config: Any, info: DatasetInfo, *,
                   train: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]]
                   | None = None,
                   path: str | os.PathLike | None = None,
                   source: Mapping[str, Any] | None = None
                   ) -> tuple[FeatureNet, dict, dict[str, Any]]:
  """Restores the cached classifier of `recipe`, or trains it and caches it.

  Args:
    recipe: how it is trained; one head per `recipe.fields` (empty: every
      `info.conditions` field).
    data_config: the dataset config (identity of the cache).
    info: its DatasetInfo.
    train: real train split arrays (`image` `[N, *spatial, C]` + conditions),
      at most `recipe.max_train` of them, or a function returning them
      (called only when it must be trained); None: loaded here when needed.
    path: an explicit directory (None: the keyed cache, `cache_path`).
    source: what `train` is when it is not the real train split (e.g.
      fresh renders); part of the cache key. `train` must then be given.

  Returns:
    (model, params, metadata); metadata['reused'] is True when it was restored.

  Raises:
    ValueError: a classifier cached at `path` was trained on a different
      dataset or with a different recipe, or `recipe.fields` names a
      condition the dataset lacks.
  """
  if source and train is None:
    raise ValueError(f"a classifier trained on {dict(source)} needs `train`")
  path = cache_path(data_config, info, recipe, path, source)
  key = cache_key(data_config, info, recipe, source)
  info = select_fields(info, recipe)
  if os.path.exists(os.path.join(path, "extractor.json")):
    model, params, meta = training.load_extractor(path)
    if meta.get("key") != json.loads(json.dumps(key)):
      raise ValueError(
          f"the classifier at {path} was trained for {meta.get('key')}, not for "
          f"this recipe ({key}); delete it or choose another path")
    return model, params, {**meta, "reused": True, "path": path}
  if train is None:
    train = data_lib.load_arrays(data_config, split="train", max_examples=recipe.max_train)
  elif callable(train):
    train = train()
  if info.conditions:
    model, params, history = training.train_feature_extractor(
        train["image"], {f.name: train[f.name] for f in info.conditions},
        info.conditions, **recipe.optimisation, **recipe.architecture)
  else:
    model, params, history = training.train_pretext_extractor(
        train["image"], **recipe.optimisation, **recipe.architecture)
  meta = {"key": key, "num_train_images": int(train["image"].shape[0]),
          "final_train_metrics": history[-1]}
  # Written beside, renamed when complete: a half-written directory (killed
  # process, full disk) is never restored, and a leftover one is replaced.
  partial = f"{path}.partial-{os.getpid()}"
  shutil.rmtree(partial, ignore_errors=True)
  training.save_extractor(partial, model, params, input_shape=info.image_shape,
                          metadata=meta)
  if os.path.exists(os.path.join(path, "extractor.json")):
    shutil.rmtree(partial)  # another process finished the same recipe first
  else:
    if os.path.isdir(path):  # incomplete (no extractor.json): a killed earlier save
      shutil.rmtree(path)
    os.replace(partial, path)
  return model, params, {**meta, "reused": False, "path": path}
