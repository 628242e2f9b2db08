"""A baseline run's generator config, rebuilt from the `config.json` it was trained with.

The baseline (e.g. a `:cnn` run on the same data and budget) is scored beside
the evaluated run with the same extractor, requested conditions and noise;
only its model section differs.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import ml_collections

from medgen_jax.train import checkpoint as ckpt_lib


def baseline_generator_config(config: Any, baseline_workdir: str) -> Any:
  """`config` with the model section the baseline run in `baseline_workdir`
  was trained with (its `config.json`), after checking it has a checkpoint.

  Raises:
    FileNotFoundError: no checkpoint or no config.json there.
    ValueError: the baseline was trained on other data (image shape,
      modalities) than `config`.
  """
  ckpt_lib.require_checkpoint(baseline_workdir)
  path = os.path.join(baseline_workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"baseline run {os.path.abspath(baseline_workdir)} has no "
                            f"config.json to rebuild its generator from")
  with open(path) as f:
    saved = json.load(f)
  for field in ("image_size", "depth", "mode", "modalities"):
    mine, theirs = config.data.get(field), saved.get("data", {}).get(field)
    if isinstance(mine, tuple):
      mine = list(mine)
    if theirs is not None and mine != theirs:
      raise ValueError(f"baseline run {baseline_workdir} was trained with "
                       f"data.{field}={theirs!r}, this evaluation uses {mine!r}")
  out = copy.deepcopy(config)
  with out.unlocked():
    out.model = ml_collections.ConfigDict(saved["model"])
  return out
