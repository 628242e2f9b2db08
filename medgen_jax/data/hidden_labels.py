"""Labels hidden at read time: the unlabelled-target-site scenario.

`config.data.hide_labels = 'lesion:site=3'` reads the train split with the
`lesion` label of every example whose `site` is 3 set to unknown (-1 for a
categorical field, NaN for a continuous one), so a generator trained on that
split sees the target site's images but not its labels, as in a multi-centre
study where the new hospital's scans are not annotated. Several rules are
separated by ';'. The value after '=' is a class name or index of the
(categorical) selecting field.

`'lesion:keep=100,seed=0,of=none|large'` keeps the `lesion` label of 100
train examples only: of the examples whose stored label is one of `of`
(every class when `of` is left out), listed in stored order, the first 100
of a permutation drawn with `seed`; every other example's label is unknown.
A generator trained so sees the labels of exactly the real set that the
augmentation study (`studies.downstream`) gives its classifier at that size
(`keep_indices` picks both), and the other images without labels.

Only the train split is affected: the held-out splits keep their labels for
evaluation. It is a read-time choice (the stored dataset is unchanged), but
it changes what a condition teacher learns, so it is part of the classifier
cache key (`medgen_jax.classifier.cache`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from medgen_jax.data.info import CATEGORICAL, DatasetInfo


@dataclasses.dataclass(frozen=True)
class HiddenLabel:
  """Set `field` to unknown where `where_field == where_value` (a class index)."""
  field: str
  where_field: str
  where_value: int


@dataclasses.dataclass(frozen=True)
class KeepLabels:
  """Keep `field` for `num` examples only (`keep_indices`), unknown elsewhere.

  Attributes:
    field: a categorical condition.
    num: how many labels are kept.
    seed: seed of the permutation that picks them.
    classes: class indices the kept examples are drawn from.
  """
  field: str
  num: int
  seed: int
  classes: tuple[int, ...]


def keep_indices(values: np.ndarray, rule: KeepLabels) -> np.ndarray:
  """Stored indices whose `rule.field` label is kept, given the stored
  labels `values` `[num_examples]` of the train split.

  The candidates are the examples labelled with one of `rule.classes`, in
  stored order; the kept ones are the first `rule.num` of
  `np.random.default_rng(rule.seed).permutation(len(candidates))`, so the
  sets of one seed are nested in `num`.

  Raises:
    ValueError: fewer candidates than `rule.num`.
  """
  candidates = np.flatnonzero(np.isin(np.asarray(values), rule.classes))
  if len(candidates) < rule.num:
    raise ValueError(f"data.hide_labels keeps {rule.num} {rule.field!r} labels, but the "
                     f"train split has only {len(candidates)} examples of classes "
                     f"{list(rule.classes)}")
  order = np.random.default_rng(rule.seed).permutation(len(candidates))
  return candidates[order[:rule.num]]


def keep_rule(field: str, num: int, seed: int, classes) -> str:
  """The `data.hide_labels` text of a KeepLabels rule (class names or indices)."""
  return f"{field}:keep={int(num)},seed={int(seed)},of={'|'.join(str(c) for c in classes)}"


def _condition(item: str, name: str, info: DatasetInfo, *, categorical_to: str = ""):
  """The condition `name` of a rule `item`; with `categorical_to` (what the
  rule does with it) it must be categorical.

  Raises:
    ValueError: the dataset has no such condition, or it is not categorical.
  """
  names = [f.name for f in info.conditions]
  if name not in names:
    raise ValueError(f"data.hide_labels rule {item!r}: dataset {info.name!r} has no "
                     f"condition {name!r}; it has {names}")
  condition = info.condition(name)
  if categorical_to and condition.kind != CATEGORICAL:
    raise ValueError(f"data.hide_labels rule {item!r}: {name!r} must be categorical "
                     f"{categorical_to}")
  return condition


def _parse_keep(item: str, field: str, spec: str, info: DatasetInfo) -> KeepLabels:
  """'keep=100,seed=0,of=none|large' (after 'field:') -> KeepLabels."""
  parts = dict(p.strip().partition("=")[::2] for p in spec.split(","))
  target = _condition(item, field, info, categorical_to="to keep some of its labels")
  unknown = sorted(set(parts) - {"keep", "seed", "of"})
  try:
    num, seed = int(parts["keep"]), int(parts.get("seed", "0"))
  except (KeyError, ValueError):
    num = seed = -1
  if unknown or num < 1 or seed < 0:
    raise ValueError(f"data.hide_labels rule {item!r} must look like "
                     f"'field:keep=N,seed=S,of=class|class' (N >= 1, S >= 0; seed and "
                     f"of optional)")
  names = [c for c in parts.get("of", "").split("|") if c.strip()]
  classes = (tuple(int(target.parse(c.strip())) for c in names) if names
             else tuple(range(target.num_classes)))
  return KeepLabels(field, num, seed, classes)


def parse_hidden_labels(text: str | None, info: DatasetInfo
                        ) -> tuple[HiddenLabel | KeepLabels, ...]:
  """'lesion:site=3;age:site=B' or 'lesion:keep=100,seed=0,of=none|large'
  -> rules, validated against `info.conditions`.

  Raises:
    ValueError: a malformed rule, an unknown field, a selecting field that is
      not categorical, or an unknown class (one message naming it).
  """
  rules = []
  for item in (text or "").split(";"):
    item = item.strip()
    if not item:
      continue
    field, sep, where = item.partition(":")
    if sep and where.strip().startswith("keep="):
      rules.append(_parse_keep(item, field.strip(), where.strip(), info))
      continue
    where_field, eq, value = where.partition("=")
    field, where_field, value = field.strip(), where_field.strip(), value.strip()
    if not (sep and eq and field and where_field and value):
      raise ValueError(f"data.hide_labels rule {item!r} must look like "
                       f"'field:other_field=class' (e.g. 'lesion:site=3')")
    _condition(item, field, info)
    selector = _condition(item, where_field, info, categorical_to="to select examples")
    rules.append(HiddenLabel(field, where_field, int(selector.parse(value))))
  return tuple(rules)


def hide(example: Mapping[str, np.ndarray], rules: tuple[HiddenLabel | KeepLabels, ...],
         info: DatasetInfo, *, kept: Mapping[str, Any] | None = None
         ) -> dict[str, np.ndarray]:
  """A copy of `example` (one example or a batch) with the rules applied.

  Every rule selects on the labels as stored, so rules do not interact. A
  KeepLabels rule needs `kept[field]`: whether this example (or each of
  the batch) is one of its `keep_indices`.
  """
  out = dict(example)
  for rule in rules:
    if isinstance(rule, KeepLabels):
      selected = ~np.asarray(kept[rule.field], bool)
    else:
      selected = np.asarray(example[rule.where_field]) == rule.where_value
    unknown = -1 if info.condition(rule.field).kind == CATEGORICAL else np.nan
    value = np.asarray(out[rule.field])
    out[rule.field] = np.where(selected, np.asarray(unknown, value.dtype), value)
  return out
