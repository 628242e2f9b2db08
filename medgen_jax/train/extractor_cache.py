"""The domain extractor's settings and its on-disk cache, shared by train and eval.

One recipe (`SETTINGS`, read from `config.eval`) trains two networks on the
real train split: the evaluation's domain extractor and, with its own seed
and step count, the GAN's frozen condition teacher
(`medgen_jax.train.loop.build_teacher`). Either is trained once and cached:
`get_extractor` restores it from a directory keyed by the dataset's identity
and the recipe, or trains and saves it there. A dataset without conditions
gets the label-free rotation-pretext extractor
(`extractor.train_pretext_extractor`; its key says `objective`). The cache
directory is written under a temporary name and renamed when complete, so a
process killed while saving leaves nothing that looks like an extractor.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from medgen_jax.data import builders
from medgen_jax.data.info import DatasetInfo
from medgen_jax.train import extractor

# The recipe's defaults; `config.eval` overrides them. Every key here is part
# of the cache key except the path itself.
SETTINGS: dict[str, Any] = dict(
    extractor_path=None,       # None: a cache dir keyed by dataset identity
    extractor_steps=1500,
    extractor_batch_size=64,
    extractor_lr=1e-3,
    extractor_widths=(16, 32, 64),
    extractor_feature_dim=64,
    # Space-to-depth by 2 (the first stage runs on 4x fewer positions, every
    # pixel kept) and mean+max pooling: unlike the full-resolution, mean-pooled
    # extractor it reads the phantom's lesion class (probe table, commit 4499cf7).
    extractor_stem_patch=2,
    extractor_pooling="mean_max",
    extractor_seed=0,
    max_train=None,            # cap on real train images (None: all)
)
KEY_FIELDS = tuple(k for k in SETTINGS if k != "extractor_path")


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
  """The recipe keys of `settings`, validated (one ValueError naming the field).

  Returns:
    a copy with `extractor_widths` as a tuple of ints.
  """
  s = dict(settings)
  for key in ("extractor_steps", "extractor_batch_size"):
    if int(s[key]) < 1:
      raise ValueError(f"eval.{key} must be >= 1, got {s[key]}")
  s["extractor_widths"] = tuple(int(w) for w in s["extractor_widths"])
  extractor.make_extractor((), **extractor.architecture_from(s, prefix="extractor_"))
  return s


def extractor_settings(config: Any) -> dict[str, Any]:
  """`SETTINGS` overridden by the recipe keys of `config.eval`, validated.

  Other keys of `config.eval` (sample counts, metric settings) belong to the
  evaluation and are left to `medgen_jax.eval.settings`.
  """
  given = dict(config.get("eval", None) or {})
  return check_settings({**SETTINGS, **{k: v for k, v in given.items() if k in SETTINGS}})


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


def extractor_key(data_config: Any, info: DatasetInfo,
                  settings: Mapping[str, Any]) -> dict[str, Any]:
  """What identifies an extractor: the dataset (built dir, channels, window)
  and its training settings. Stored beside it and compared on reuse."""
  key = {"dataset": _dataset_identity(data_config, info),
         "training": {k: (list(settings[k]) if isinstance(settings[k], tuple)
                          else settings[k]) for k in KEY_FIELDS}}
  if not info.conditions:  # (conditioned keys stay as they were: their caches still match)
    key["objective"] = "rotation_pretext"
  return key


def extractor_path(data_config: Any, info: DatasetInfo,
                   settings: Mapping[str, Any]) -> str:
  """`settings['extractor_path']`, or `<data_dir>/medgen_extractors/<name>-<hash>`.

  The default sits beside the datasets, so every run on the same dataset (and
  extractor settings) shares one extractor.
  """
  if settings.get("extractor_path"):
    return os.path.abspath(os.fspath(settings["extractor_path"]))
  key = extractor_key(data_config, info, settings)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
  return os.path.join(builders.data_dir(data_config), "medgen_extractors",
                      f"{info.name}-{digest[:12]}")


def get_extractor(data_config: Any, info: DatasetInfo, train: Mapping[str, np.ndarray],
                  settings: Mapping[str, Any]
                  ) -> tuple[extractor.FeatureNet, dict, dict[str, Any]]:
  """Restores the cached extractor, or trains it on `train` and caches it.

  Args:
    data_config: the dataset config (identity of the cache).
    info: its DatasetInfo; one head per `info.conditions` field.
    train: real train split arrays (`image` `[N, *spatial, C]` + conditions).
    settings: the recipe (`extractor_settings(config)`, or the evaluation's
      settings, which include it).

  Returns:
    (model, params, metadata); metadata['reused'] is True when it was restored.

  Raises:
    ValueError: a cached extractor at the configured path was trained on a
      different dataset or with different settings.
  """
  path = extractor_path(data_config, info, settings)
  key = extractor_key(data_config, info, settings)
  if os.path.exists(os.path.join(path, "extractor.json")):
    model, params, meta = extractor.load_extractor(path)
    if meta.get("key") != json.loads(json.dumps(key)):
      raise ValueError(
          f"the feature extractor at {path} was trained for {meta.get('key')}, "
          f"not for this evaluation ({key}); delete it or set "
          f"config.eval.extractor_path elsewhere")
    return model, params, {**meta, "reused": True, "path": path}
  recipe = dict(steps=int(settings["extractor_steps"]),
                batch_size=int(settings["extractor_batch_size"]),
                seed=int(settings["extractor_seed"]), lr=float(settings["extractor_lr"]),
                **extractor.architecture_from(settings, prefix="extractor_"))
  if info.conditions:
    model, params, history = extractor.train_feature_extractor(
        train["image"], {f.name: train[f.name] for f in info.conditions},
        info.conditions, **recipe)
  else:
    model, params, history = extractor.train_pretext_extractor(train["image"], **recipe)
  meta = {"key": key, "num_train_images": int(train["image"].shape[0]),
          "final_train_metrics": history[-1]}
  # Written beside, renamed when complete: a half-written directory (killed
  # process, full disk) is never restored, and a leftover one is replaced.
  partial = f"{path}.partial-{os.getpid()}"
  shutil.rmtree(partial, ignore_errors=True)
  extractor.save_extractor(partial, model, params, input_shape=info.image_shape,
                           metadata=meta)
  if os.path.exists(os.path.join(path, "extractor.json")):
    shutil.rmtree(partial)  # another process finished the same recipe first
  else:
    if os.path.isdir(path):  # incomplete (no extractor.json): a killed earlier save
      shutil.rmtree(path)
    os.replace(partial, path)
  return model, params, {**meta, "reused": False, "path": path}
