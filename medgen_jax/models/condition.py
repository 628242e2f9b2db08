"""Modules built from a dataset's condition fields: the embedding and the heads.

`medgen_jax.conditioning` does not import the data layer; this is the one
place that turns `DatasetInfo.conditions` into `ConditionEmbedding`'s
constructor arguments, and into one prediction head per field.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

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


def condition_heads(h: jax.Array, fields: Sequence[ConditionField], *,
                    prefix: str) -> dict[str, jax.Array]:
  """One linear head per field on features `h` [B, F]: class logits [B, K]
  (categorical) or one value [B] (continuous), named `<prefix>_<field>`.

  Call from inside a compact module method; the Dense layers become its
  submodules (`medgen_jax.classifier.network.FeatureNet`, the
  discriminator's AC-GAN heads).
  """
  heads = {}
  for f in fields:
    if f.kind == CATEGORICAL:
      heads[f.name] = nn.Dense(f.num_classes, name=f"{prefix}_{f.name}")(h)
    else:
      heads[f.name] = nn.Dense(1, name=f"{prefix}_{f.name}")(h)[:, 0]
  return heads
