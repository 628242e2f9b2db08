"""The evaluation's JSON output."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np


def write_metrics(path: str, metrics: Mapping[str, Any]) -> str:
  """Writes flat metrics as JSON (NaN as null, so strict parsers accept it)."""
  def clean(v):
    if isinstance(v, (float, np.floating)):
      return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
      return int(v)
    return v
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({k: clean(v) for k, v in metrics.items()}, f, indent=2,
              sort_keys=True)
  return path
