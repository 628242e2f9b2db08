"""Labels hidden at read time: the unlabelled-target-site scenario.

`config.data.hide_labels = 'lesion:site=3'` reads the train split with the
`lesion` label of every example whose `site` is 3 set to unknown (-1 for a
categorical field, NaN for a continuous one), so a generator trained on that
split sees the target site's images but not its labels, as in a multi-centre
study where the new hospital's scans are not annotated. Several rules are
separated by ';'. The value after '=' is a class name or index of the
(categorical) selecting field.

Only the train split is affected: the held-out splits keep their labels for
evaluation. It is a read-time choice (the stored dataset is unchanged), but
it changes what a condition teacher learns, so it is part of the classifier
cache key (`medgen_jax.classifier.cache`).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from medgen_jax.data.info import CATEGORICAL, DatasetInfo


@dataclasses.dataclass(frozen=True)
class HiddenLabel:
  """Set `field` to unknown where `where_field == where_value` (a class index)."""
  field: str
  where_field: str
  where_value: int


def parse_hidden_labels(text: str | None, info: DatasetInfo) -> tuple[HiddenLabel, ...]:
  """'lesion:site=3;age:site=B' -> rules, validated against `info.conditions`.

  Raises:
    ValueError: a malformed rule, an unknown field, a selecting field that is
      not categorical, or an unknown class (one message naming it).
  """
  rules = []
  names = [f.name for f in info.conditions]
  for item in (text or "").split(";"):
    item = item.strip()
    if not item:
      continue
    field, sep, where = item.partition(":")
    where_field, eq, value = where.partition("=")
    field, where_field, value = field.strip(), where_field.strip(), value.strip()
    if not (sep and eq and field and where_field and value):
      raise ValueError(f"data.hide_labels rule {item!r} must look like "
                       f"'field:other_field=class' (e.g. 'lesion:site=3')")
    for name in (field, where_field):
      if name not in names:
        raise ValueError(f"data.hide_labels rule {item!r}: dataset {info.name!r} has no "
                         f"condition {name!r}; it has {names}")
    selector = info.condition(where_field)
    if selector.kind != CATEGORICAL:
      raise ValueError(f"data.hide_labels rule {item!r}: {where_field!r} must be "
                       f"categorical to select examples")
    rules.append(HiddenLabel(field, where_field, int(selector.parse(value))))
  return tuple(rules)


def hide(example: Mapping[str, np.ndarray], rules: tuple[HiddenLabel, ...],
         info: DatasetInfo) -> dict[str, np.ndarray]:
  """A copy of `example` (one example or a batch) with the rules applied.

  Every rule selects on the labels as stored, so rules do not interact.
  """
  out = dict(example)
  for rule in rules:
    selected = np.asarray(example[rule.where_field]) == rule.where_value
    unknown = -1 if info.condition(rule.field).kind == CATEGORICAL else np.nan
    value = np.asarray(out[rule.field])
    out[rule.field] = np.where(selected, np.asarray(unknown, value.dtype), value)
  return out
