"""What a dataset is, independent of how it is stored: shapes, conditions, units.

`DatasetInfo` is the one object that travels from the data layer to models,
training, evaluation and inference. It holds no arrays and knows nothing about
models, so every later stage can be built from it alone (condition embeddings
from `conditions`, output channels from `image_shape`, physical units from
`intensity`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import numpy as np

CATEGORICAL = "categorical"
CONTINUOUS = "continuous"


@dataclasses.dataclass(frozen=True)
class ConditionField:
  """One clinical covariate a generator can be conditioned on.

  Categorical values are int32 class indices in [0, num_classes); -1 means
  "unknown" (the model uses its learned null embedding). Continuous values are
  float32 in physical units (e.g. age in years) inside `value_range`; NaN means
  unknown.
  """
  name: str
  kind: str
  num_classes: int = 0
  class_names: tuple[str, ...] = ()
  value_range: tuple[float, float] = (0.0, 1.0)

  def __post_init__(self):
    if self.kind not in (CATEGORICAL, CONTINUOUS):
      raise ValueError(f"ConditionField {self.name!r}: kind must be "
                       f"{CATEGORICAL!r} or {CONTINUOUS!r}, got {self.kind!r}")
    if self.kind == CATEGORICAL and self.num_classes < 1:
      raise ValueError(f"ConditionField {self.name!r}: categorical needs "
                       f"num_classes >= 1, got {self.num_classes}")

  def parse(self, text: str) -> float | int:
    """Parses a user-given value ('large', '2', '70') and validates it."""
    if self.kind == CATEGORICAL:
      if text in self.class_names:
        return self.class_names.index(text)
      try:
        value = int(text)
      except ValueError:
        raise ValueError(
            f"condition {self.name!r}: unknown class {text!r}; expected one of "
            f"{list(self.class_names) or list(range(self.num_classes))}") from None
      if not 0 <= value < self.num_classes:
        raise ValueError(f"condition {self.name!r}: class index {value} out of "
                         f"range [0, {self.num_classes})")
      return value
    try:
      value = float(text)
    except ValueError:
      raise ValueError(f"condition {self.name!r}: {text!r} is not a number") from None
    lo, hi = self.value_range
    if not lo <= value <= hi:
      raise ValueError(f"condition {self.name!r}: {value} outside the dataset's "
                       f"range [{lo}, {hi}]")
    return value


@dataclasses.dataclass(frozen=True)
class IntensityTransform:
  """Linear map between one channel's physical units and the model range [-1, 1].

  Physical values are clipped to [lo, hi] (e.g. a CT window in HU, an SUV
  ceiling for PET, or [0, 1] after percentile normalisation for MRI) and mapped
  linearly onto [-1, 1]. `to_physical` is the exact inverse inside the window.
  """
  modality: str
  unit: str
  lo: float
  hi: float
  description: str = ""

  def to_model(self, x):
    x = np.clip(np.asarray(x, np.float32), self.lo, self.hi)
    return (x - self.lo) / (self.hi - self.lo) * 2.0 - 1.0

  def to_physical(self, y):
    y = np.asarray(y, np.float32)
    return (y + 1.0) * 0.5 * (self.hi - self.lo) + self.lo


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of a built dataset.

  Attributes:
    name: builder name, e.g. 'ct_phantom'.
    image_shape: spatial dims then channels: (H, W, C) or (D, H, W, C).
    modalities: one name per channel, e.g. ('ct',) or ('ct', 'pet').
    intensity: one IntensityTransform per channel.
    conditions: the covariates every example carries (may be empty).
    spacing_mm: voxel spacing per spatial axis, for writing NIfTI.
    num_examples: examples per split.
    extra: builder-specific JSON-able facts (intensity policy, skipped files).
  """
  name: str
  image_shape: tuple[int, ...]
  modalities: tuple[str, ...]
  intensity: tuple[IntensityTransform, ...]
  conditions: tuple[ConditionField, ...] = ()
  spacing_mm: tuple[float, ...] = ()
  num_examples: Mapping[str, int] = dataclasses.field(default_factory=dict)
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if len(self.modalities) != self.image_shape[-1]:
      raise ValueError(f"DatasetInfo {self.name!r}: {len(self.modalities)} "
                       f"modalities but {self.image_shape[-1]} channels")
    if len(self.intensity) != len(self.modalities):
      raise ValueError(f"DatasetInfo {self.name!r}: one IntensityTransform per "
                       f"channel is needed")

  @property
  def spatial_shape(self) -> tuple[int, ...]:
    return tuple(self.image_shape[:-1])

  @property
  def num_channels(self) -> int:
    return self.image_shape[-1]

  def condition(self, name: str) -> ConditionField:
    for field in self.conditions:
      if field.name == name:
        return field
    raise KeyError(f"dataset {self.name!r} has no condition {name!r}; it has "
                   f"{[f.name for f in self.conditions]}")

  def to_physical(self, images) -> np.ndarray:
    """[..., C] model-range images -> physical units per channel."""
    images = np.asarray(images, np.float32)
    return np.stack([t.to_physical(images[..., c])
                     for c, t in enumerate(self.intensity)], axis=-1)

  def to_model(self, images) -> np.ndarray:
    images = np.asarray(images, np.float32)
    return np.stack([t.to_model(images[..., c])
                     for c, t in enumerate(self.intensity)], axis=-1)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "DatasetInfo":
    d = json.loads(text)
    d["image_shape"] = tuple(d["image_shape"])
    d["modalities"] = tuple(d["modalities"])
    d["spacing_mm"] = tuple(d["spacing_mm"])
    d["intensity"] = tuple(IntensityTransform(**t) for t in d["intensity"])
    d["conditions"] = tuple(
        ConditionField(**{**c, "class_names": tuple(c["class_names"]),
                          "value_range": tuple(c["value_range"])})
        for c in d["conditions"])
    return cls(**d)


def condition_dict(info: DatasetInfo, batch: Mapping[str, Any]) -> dict[str, Any]:
  """The condition arrays of a batch, keyed by field name, in info order."""
  missing = [f.name for f in info.conditions if f.name not in batch]
  if missing:
    raise KeyError(f"batch lacks condition fields {missing}")
  return {f.name: batch[f.name] for f in info.conditions}


def uniform_conditions(info: DatasetInfo, rng: np.random.Generator,
                       n: int) -> dict[str, np.ndarray]:
  """Random conditions covering each field's support (for sampling and eval)."""
  out = {}
  for f in info.conditions:
    if f.kind == CATEGORICAL:
      out[f.name] = rng.integers(0, f.num_classes, size=n).astype(np.int32)
    else:
      lo, hi = f.value_range
      out[f.name] = rng.uniform(lo, hi, size=n).astype(np.float32)
  return out


