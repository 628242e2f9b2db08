"""Exponential moving average of generator parameters (used for sampling and eval)."""
from __future__ import annotations

from typing import Any

import jax


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf (same pytree structure)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype),
                      ema_params, params)
