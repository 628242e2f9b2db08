"""From `config.data` to batches in the model range: load_dataset/info/arrays.

The TFDS dataset is built on first use (nothing is downloaded) and read back
with `as_data_source()`; grain then shards it by process, shuffles each epoch
with `seed`, maps to [-1, 1] and batches. The returned grain DatasetIterator's
`get_state()` is a small JSON-able dict, so a training checkpoint can store it
and a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import grain
import jax
import numpy as np

from medgen_jax.data import builders
from medgen_jax.data import builders_phantom
from medgen_jax.data import hidden_labels
from medgen_jax.data.info import CATEGORICAL, DatasetInfo
from medgen_jax.data.intensity import transform_for


def _prepare(data_config) -> str:
  """Builds the dataset if needed; returns its TFDS directory."""
  summary = builders.build(data_config)
  return summary["builder_dir"]


def _select(info: DatasetInfo, data_config) -> DatasetInfo:
  """Restricts the stored channels to data_config.modalities and applies the
  config's windows (CT window / SUV ceiling are read-time choices)."""
  wanted = builders.as_tuple(data_config.get("modalities")) or info.modalities
  missing = [m for m in wanted if m not in info.modalities]
  if missing:
    raise ValueError(f"dataset {info.name!r} has no modality {missing}; it has "
                     f"{list(info.modalities)}")
  policy = dict(info.extra.get("intensity_policy", {}))
  transforms = []
  for m in wanted:
    t = info.intensity[info.modalities.index(m)]
    if policy.get(m) in ("ct_window", "suv"):
      t = transform_for(m, policy[m],
                        ct_window=builders.as_tuple(data_config.get("ct_window",
                                                                    (-1000.0, 1000.0))),
                        pet_max_suv=data_config.get("pet_max_suv", 10.0))
    transforms.append(t)
  return dataclasses.replace(
      info, image_shape=info.spatial_shape + (len(wanted),), modalities=tuple(wanted),
      intensity=tuple(transforms))


def load_info(data_config) -> DatasetInfo:
  """The DatasetInfo of `data_config` (building the dataset if needed);
  `data.hide_labels` is validated against its conditions here."""
  info = _select(builders.read_info(_prepare(data_config)), data_config)
  hidden_labels.parse_hidden_labels(data_config.get("hide_labels"), info)
  return info


def _to_model_fn(info: DatasetInfo, hidden: tuple = (), kept: Mapping[str, Any] | None = None):
  """Per-example map (stored index, example) -> `image` in [-1, 1] +
  conditions, with the `hidden` labels set to unknown (`kept`: per
  KeepLabels field, a bool per stored index, see `_kept`)."""

  def to_model(index: int | None, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    image = np.stack([t.to_model(example[t.modality]) for t in info.intensity], -1)
    out = {"image": image.astype(np.float32)}
    for field in info.conditions:
      dtype = np.int32 if field.kind == CATEGORICAL else np.float32
      out[field.name] = np.asarray(example[field.name], dtype)
    if "lesion_mask" in example:
      out["lesion_mask"] = np.asarray(example["lesion_mask"], np.uint8)
      out["lesion_diameter_mm"] = np.asarray(example["lesion_diameter_mm"], np.float32)
    if not hidden:
      return out
    # grain passes the index of the repeated stream: stored index = index mod size.
    return hidden_labels.hide(out, hidden, info,
                              kept={f: m[index % len(m)] for f, m in (kept or {}).items()})

  return to_model


def hidden_for(data_config, info: DatasetInfo, split: str) -> tuple:
  """The `data.hide_labels` rules that apply to `split` (the train split only)."""
  rules = hidden_labels.parse_hidden_labels(data_config.get("hide_labels"), info)
  return rules if split == "train" else ()


def _kept(source, rules: tuple) -> dict[str, np.ndarray]:
  """Per KeepLabels rule's field: bool `[len(source)]`, True where its label is
  kept (`hidden_labels.keep_indices` over the stored labels).

  The split is decoded once, whatever the number of rules, and only when a
  KeepLabels rule needs it.
  """
  keep = [r for r in rules if isinstance(r, hidden_labels.KeepLabels)]
  if not keep:
    return {}
  examples = [source[i] for i in range(len(source))]
  out = {}
  for rule in keep:
    values = np.array([int(example[rule.field]) for example in examples])
    mask = np.zeros(len(source), bool)
    mask[hidden_labels.keep_indices(values, rule)] = True
    out[rule.field] = mask
  return out


def _model_fn_for(data_config, info: DatasetInfo, split: str, source):
  hidden = hidden_for(data_config, info, split)
  return _to_model_fn(info, hidden, _kept(source, hidden))


def _source(path: str, split: str):
  builder = builders.read_builder(path)
  if split not in builder.info.splits:
    raise ValueError(f"dataset at {path} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)


def load_dataset(data_config, *, split: str, batch_size: int, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None):
  """A checkpointable grain iterator of batches and the DatasetInfo.

  Args:
    data_config: the `config.data` ConfigDict (see configs/data_phantom.py).
    split: 'train' | 'validation' | 'test'.
    batch_size: per-process batch size; the last partial batch is dropped.
    seed: shuffle seed (each epoch is a different permutation).
    shuffle: False keeps the stored order (evaluation).
    num_epochs: None repeats forever.
    process_index, process_count: this process's shard of the examples
      (default jax.process_index() / jax.process_count()).

  Returns:
    (iterator, info): batches are dicts with `image` float32
    [batch, *spatial, channels] in [-1, 1], one entry per condition field
    (int32 categorical, float32 continuous; the train split with the
    `data.hide_labels` rules applied, see `medgen_jax.data.hidden_labels`),
    and `lesion_mask` uint8 [batch, *spatial] + `lesion_diameter_mm` float32
    [batch] when stored.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  path = _prepare(data_config)
  info = _select(builders.read_info(path), data_config)
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} outside [0, {count})")
  source = _source(path, split)
  # Mapped before sharding and shuffling, so the map sees stored indices.
  ds = grain.MapDataset.source(source).map_with_index(
      _model_fn_for(data_config, info, split, source))[index::count]
  if len(ds) < batch_size:
    raise ValueError(f"split {split!r} has {len(ds)} examples for process {index} "
                     f"of {count}, fewer than batch_size {batch_size}")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True)
  return iter(ds), info


def load_arrays(data_config, *, split: str, max_examples: int | None = None
                ) -> dict[str, np.ndarray]:
  """A split as numpy arrays in stored order (images in [-1, 1]); the train
  split with the `data.hide_labels` rules applied."""
  path = _prepare(data_config)
  info = _select(builders.read_info(path), data_config)
  source = _source(path, split)
  n = len(source) if max_examples is None else min(len(source), max_examples)
  to_model = _model_fn_for(data_config, info, split, source)
  examples = [to_model(i, source[i]) for i in range(n)]
  if not examples:
    raise ValueError(f"split {split!r} is empty")
  return _stack(examples)


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Model-ready examples -> one array per key, examples along axis 0."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def render_fresh_arrays(data_config, *, num_subjects: int) -> dict[str, np.ndarray]:
  """Labelled examples of `num_subjects` new subjects, as `load_arrays` returns
  them (images in [-1, 1], every condition known), rendered outside every
  split. Only a renderer can do this: ct_phantom only.

  Raises:
    ValueError: `data.name` is not 'ct_phantom'.
  """
  if data_config.name != "ct_phantom":
    raise ValueError(f"fresh renders need the ct_phantom renderer; data.name is "
                     f"{data_config.name!r}")
  info = _select(builders_phantom.stored_info(data_config), data_config)
  to_model = _to_model_fn(info)
  return _stack([to_model(None, r)
                 for r in builders_phantom.fresh_records(data_config, num_subjects)])

