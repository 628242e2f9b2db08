"""Clinical covariates -> one conditioning vector, and adaLN-Zero gates that use it.

Conditions arrive as `{name: [batch]}`: categorical int32 class indices (-1 =
unknown) and continuous float32 in physical units (NaN = unknown), as described
by `medgen_jax.data.info.ConditionField`. Every field has a learned null
embedding used for unknown values and for classifier-free-guidance dropout.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def rescale_continuous(value: Array, lo: float, hi: float) -> tuple[Array, Array]:
  """(known, x): known = not NaN, x = value mapped [lo, hi] -> [-1, 1].

  NaN (unknown) is swapped for `lo` before scaling, so it cannot leak into
  gradients; callers mask with `known`.
  """
  value = jnp.asarray(value, jnp.float32)
  known = ~jnp.isnan(value)
  return known, 2.0 * (jnp.where(known, value, lo) - lo) / (hi - lo) - 1.0


class ConditionEmbedding(nn.Module):
  """Embeds categorical and continuous covariates into one `[batch, dim]` vector.

  Each field gets its own `[batch, dim]` embedding and the embeddings are summed:
  - categorical `(name, num_classes)`: `nn.Embed` with `num_classes + 1` rows;
    the extra last row is the learned null used for -1 (any negative index).
    Indices >= num_classes are a caller bug and come out as NaN (jnp.take's fill).
  - continuous `(name, lo, hi)`: mapped linearly so [lo, hi] -> [-1, 1], lifted
    with Fourier features `[x, sin(2^j pi x), cos(2^j pi x)]`, then a 2-layer MLP;
    NaN selects a learned null vector.
  With `train=True` and `dropout_rate > 0`, each field of each example is
  independently replaced by its null with that probability (rng stream
  'dropout'), so the model also learns the unconditional case for
  classifier-free guidance.

  Attributes:
    categorical: `((name, num_classes), ...)`.
    continuous: `((name, lo, hi), ...)`.
    dim: output width.
    dropout_rate: per-field null-replacement probability during training.
    num_frequencies: Fourier frequencies for continuous fields.
  """
  categorical: Sequence[tuple[str, int]] = ()
  continuous: Sequence[tuple[str, float, float]] = ()
  dim: int = 128
  dropout_rate: float = 0.0
  num_frequencies: int = 4

  def _check(self, conditions: Mapping[str, Array]) -> int:
    expected = [name for name, _ in self.categorical] + [c[0] for c in self.continuous]
    if not expected:
      raise ValueError("ConditionEmbedding needs at least one categorical or continuous field")
    if len(set(expected)) != len(expected):
      raise ValueError(f"ConditionEmbedding: duplicate field names in {expected}")
    missing = [n for n in expected if n not in conditions]
    unknown = [n for n in conditions if n not in expected]
    if missing or unknown:
      raise KeyError(f"ConditionEmbedding: missing fields {missing}, unknown fields "
                     f"{unknown}; expected exactly {expected}")
    batch = None
    for name in expected:
      shape = np.shape(conditions[name])
      if len(shape) != 1:
        raise ValueError(f"condition {name!r} must have shape [batch]; got {shape}")
      if batch is not None and shape[0] != batch:
        raise ValueError(f"condition {name!r} has batch {shape[0]}, others have {batch}")
      batch = shape[0]
    for name, lo, hi in self.continuous:
      if not hi > lo:
        raise ValueError(f"continuous field {name!r}: range ({lo}, {hi}) needs hi > lo")
    if not 0.0 <= self.dropout_rate <= 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1]; got {self.dropout_rate}")
    return batch

  @nn.compact
  def __call__(self, conditions: Mapping[str, Array], *, train: bool) -> Array:
    """Args: conditions `{name: [batch]}`. Returns float32 `[batch, dim]`."""
    batch = self._check(conditions)
    use_dropout = train and self.dropout_rate > 0.0
    rng = self.make_rng("dropout") if use_dropout else None
    total = jnp.zeros((batch, self.dim), jnp.float32)
    fields = [(n, "cat", c) for n, c in self.categorical] + [
        (c[0], "cont", c[1:]) for c in self.continuous]
    for index, (name, kind, spec) in enumerate(fields):
      value = jnp.asarray(conditions[name])
      if kind == "cat":
        (num_classes,) = (spec,)
        table = nn.Embed(num_classes + 1, self.dim, name=f"embed_{name}")
        is_null = value < 0
        emb = table(jnp.where(is_null, num_classes, value.astype(jnp.int32)))
        null = table.embedding[num_classes]
      else:
        lo, hi = spec
        known, x = rescale_continuous(value, lo, hi)
        is_null = ~known
        emb = self._continuous_mlp(x, name)
        null = self.param(f"null_{name}", nn.initializers.normal(0.02), (self.dim,))
      if use_dropout:
        drop = jax.random.bernoulli(jax.random.fold_in(rng, index), self.dropout_rate,
                                    (batch,))
        is_null = is_null | drop
      total = total + jnp.where(is_null[:, None], null[None, :], emb)
    return total

  def _continuous_mlp(self, x: Array, name: str) -> Array:
    freqs = jnp.pi * 2.0 ** jnp.arange(self.num_frequencies, dtype=jnp.float32)
    angles = x[:, None] * freqs
    feats = jnp.concatenate([x[:, None], jnp.sin(angles), jnp.cos(angles)], axis=-1)
    h = nn.silu(nn.Dense(self.dim, name=f"mlp_{name}_0")(feats))
    return nn.Dense(self.dim, name=f"mlp_{name}_1")(h)


class AttentionGate(nn.Module):
  """adaLN-Zero modulation: condition -> (shift, scale, gate), zero-initialised.

  `Dense(3 * features)` of `silu(cond)`, kernel and bias zero, so at init
  shift = scale = gate = 0 and a residual branch `x + gate * f(x * (1 + scale) + shift)`
  is the identity. Call `(cond)` with cond `[batch, cond_dim]`; returns three
  `[batch, features]` arrays.
  """
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, cond: Array) -> tuple[Array, Array, Array]:
    if cond.ndim != 2:
      raise ValueError(f"AttentionGate expects cond [batch, cond_dim]; got shape {cond.shape}")
    out = nn.Dense(3 * self.features, kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros, dtype=self.dtype)(nn.silu(cond))
    shift, scale, gate = jnp.split(out, 3, axis=-1)
    return shift, scale, gate
