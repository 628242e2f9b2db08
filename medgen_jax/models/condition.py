"""Builds `ConditionEmbedding` from a dataset's condition fields.

`medgen_jax.conditioning` does not import the data layer; this is the one
place that turns `DatasetInfo.conditions` into its constructor arguments.
"""
from __future__ import annotations

from typing import Sequence

from medgen_jax.conditioning import ConditionEmbedding
from medgen_jax.data.info import CATEGORICAL, ConditionField


def condition_embedding(fields: Sequence[ConditionField], dim: int, *,
                        dropout_rate: float = 0.0,
                        name: str | None = None) -> ConditionEmbedding | None:
  """The embedding of `fields`, or None when the dataset has no conditions.

  Args:
    fields: `DatasetInfo.conditions`.
    dim: embedding width.
    dropout_rate: probability of dropping each condition to "unknown" in
      training (classifier-free-guidance style).
    name: module name.

  Returns:
    A `ConditionEmbedding` called as `(conditions, *, train)` -> [B, dim].
  """
  if not fields:
    return None
  categorical = tuple((f.name, f.num_classes) for f in fields
                      if f.kind == CATEGORICAL)
  continuous = tuple((f.name, float(f.value_range[0]), float(f.value_range[1]))
                     for f in fields if f.kind != CATEGORICAL)
  return ConditionEmbedding(categorical=categorical, continuous=continuous,
                            dim=dim, dropout_rate=dropout_rate, name=name)
