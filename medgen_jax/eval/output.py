"""The evaluation's JSON output."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np


def to_json(value: Any) -> Any:
  """`value` with numpy scalars as Python ones and NaN / inf as None (strict
  JSON parsers reject NaN), through nested dicts, lists and tuples."""
  if isinstance(value, Mapping):
    return {k: to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_json(path: str, value: Any, *, sort_keys: bool = False) -> str:
  """Writes `to_json(value)` to `path`, creating its folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(to_json(value), f, indent=2, sort_keys=sort_keys)
  return path


def write_metrics(path: str, metrics: Mapping[str, Any]) -> str:
  """Writes flat metrics as JSON (NaN as null, so strict parsers accept it)."""
  return write_json(path, dict(metrics), sort_keys=True)
