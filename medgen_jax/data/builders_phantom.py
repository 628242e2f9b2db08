"""`ct_phantom`: the built-in procedural chest CT + PET dataset.

Both channels are always stored (CT int16 HU, PET float32 SUV); the pipeline
picks `data.modalities`. Splits are by subject, each split drawing its
subjects from its own seed stream, so no anatomy is shared between splits.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from medgen_jax.data import builders, phantom
from medgen_jax.data.info import CATEGORICAL, CONTINUOUS, ConditionField, DatasetInfo
from medgen_jax.data.intensity import transform_for

# Bump when phantom.py changes what it renders: stale caches then rebuild.
PHANTOM_REVISION = 2
# Render stream of subjects outside the splits (streams 0-2): the evaluation
# judge's training data.
FRESH_STREAM = 7
MODALITIES = ("ct", "pet")
POLICY = {"ct": "ct_window", "pet": "suv"}
CONDITIONS = (
    ConditionField("lesion", CATEGORICAL, 3, phantom.LESION_CLASSES),
    ConditionField("age", CONTINUOUS, value_range=phantom.AGE_RANGE),
    ConditionField("site", CATEGORICAL, len(phantom.SITES),
                   tuple(f"site{i}" for i in range(len(phantom.SITES)))),
)


def condition_names(data_config) -> tuple[str, ...]:
  """Every ct_phantom example carries the same conditions."""
  del data_config
  return tuple(f.name for f in CONDITIONS)


def _num_subjects(data_config) -> dict[str, int]:
  n = data_config.num_subjects
  return {s: int(n[s]) for s in builders.SPLITS}


def validate(data_config) -> None:
  bad = [m for m in builders.as_tuple(data_config.modalities) if m not in MODALITIES]
  if bad or not builders.as_tuple(data_config.modalities):
    raise ValueError(f"ct_phantom: unknown modalities {bad}; choose from {MODALITIES}")
  counts = _num_subjects(data_config)
  if counts["train"] < 1 or min(counts.values()) < 0:
    raise ValueError(f"ct_phantom: num_subjects needs train >= 1 and no negative "
                     f"count, got {counts}")
  if data_config.mode == "2d" and int(data_config.slices_per_subject) < 1:
    raise ValueError("ct_phantom: slices_per_subject must be >= 1")


def config_name(data_config) -> str:
  fields = {"image_size": data_config.image_size, "mode": data_config.mode,
            "depth": data_config.depth if data_config.mode == "3d" else 0,
            "slices": data_config.slices_per_subject if data_config.mode == "2d" else 1,
            "subjects": _num_subjects(data_config), "seed": data_config.seed,
            "revision": PHANTOM_REVISION}
  dims = "x".join(str(d) for d in builders.spatial_shape(data_config))
  return f"{data_config.mode}_{dims}_{builders.config_hash(fields)}"


def stored_info(data_config) -> DatasetInfo:
  """DatasetInfo of the stored channels (ct, pet) under `data_config`."""
  spatial = builders.spatial_shape(data_config)
  return DatasetInfo(
      name="ct_phantom", image_shape=spatial + (len(MODALITIES),),
      modalities=MODALITIES,
      intensity=tuple(transform_for(
          m, POLICY[m], ct_window=builders.as_tuple(data_config.ct_window),
          pet_max_suv=data_config.pet_max_suv) for m in MODALITIES),
      conditions=CONDITIONS,
      spacing_mm=phantom.spacing_mm(data_config.image_size, mode=data_config.mode,
                                    depth=data_config.depth),
      extra={"intensity_policy": dict(POLICY), "has_lesion_mask": True,
             "field_of_view_mm": phantom.FOV_MM})


def subject_records(data_config, stream: int, subject: int) -> list[dict[str, Any]]:
  """The stored records of subject `subject` of render stream `stream`.

  Streams 0-2 are the train / validation / test splits (`builders.SPLITS`
  order); `FRESH_STREAM` renders subjects outside every split.
  """
  seed = (int(data_config.seed), int(stream), int(subject))
  subject_id = builders.int64_id(hashlib.sha256(repr(seed).encode()).hexdigest())
  return [{"ct": ex["ct"], "pet": ex["pet"], "lesion_mask": ex["lesion_mask"],
           "lesion_diameter_mm": np.float32(ex["lesion_diameter_mm"]),
           "lesion": ex["lesion"], "age": np.float32(ex["age"]),
           "site": ex["site"], "subject": subject_id}
          for ex in phantom.subject_examples(
              seed, image_size=data_config.image_size, mode=data_config.mode,
              depth=data_config.depth, slices_per_subject=data_config.slices_per_subject)]


def fresh_records(data_config, num_subjects: int) -> list[dict[str, Any]]:
  """Stored records of `num_subjects` subjects rendered outside every split
  (stream `FRESH_STREAM`): labelled data no split shares a subject with."""
  validate(data_config)
  if num_subjects < 1:
    raise ValueError(f"fresh phantom renders need num_subjects >= 1, got {num_subjects}")
  return [r for s in range(num_subjects) for r in subject_records(data_config, FRESH_STREAM, s)]


def plan(data_config) -> builders.Plan:
  validate(data_config)
  spatial = builders.spatial_shape(data_config)
  features = tfds.features.FeaturesDict({
      "ct": tfds.features.Tensor(shape=spatial, dtype=np.int16),
      "pet": tfds.features.Tensor(shape=spatial, dtype=np.float32),
      "lesion_mask": tfds.features.Tensor(shape=spatial, dtype=np.uint8),
      "lesion_diameter_mm": tfds.features.Scalar(dtype=np.float32),
      "lesion": tfds.features.ClassLabel(names=phantom.LESION_CLASSES),
      "age": tfds.features.Scalar(dtype=np.float32),
      "site": tfds.features.ClassLabel(num_classes=len(phantom.SITES)),
      "subject": tfds.features.Scalar(dtype=np.int64),
  })
  counts = _num_subjects(data_config)
  mode, slices = data_config.mode, data_config.slices_per_subject

  def split_examples(split_index: int, num: int):
    def generate():
      for s in range(num):
        for i, record in enumerate(subject_records(data_config, split_index, s)):
          yield f"{s}_{i}", record
    return generate

  per_subject = 1 if mode == "3d" else slices
  splits = {split: split_examples(i, counts[split])
            for i, split in enumerate(builders.SPLITS) if counts[split] > 0}
  info = stored_info(data_config)
  summary = {
      "name": "ct_phantom", "config_name": config_name(data_config),
      "subjects": {s: counts[s] for s in splits},
      "examples": {s: counts[s] * per_subject for s in splits},
      "image_shape": list(info.image_shape), "modalities": list(MODALITIES),
      "spacing_mm": list(info.spacing_mm),
      "intensity_policy": {t.modality: t.description for t in info.intensity},
      "stored_units": {"ct": "HU (int16)", "pet": "SUV (float32)"},
      "skipped": [], "skipped_counts": {}}
  return builders.Plan("ct_phantom", config_name(data_config), features, splits,
                       info, summary)
