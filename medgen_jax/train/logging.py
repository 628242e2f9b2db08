"""Metric sinks for training: metrics.jsonl, TensorBoard events (tensorboardX), tqdm.

(Imported as `medgen_jax.train.logging`; absolute imports keep the standard
library's `logging` reachable elsewhere.)
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import tensorboardX
import tqdm


class MetricWriter:
  """Appends one JSON object per logged step and mirrors the scalars to TensorBoard.

  Only the main process writes (`enabled=False` elsewhere). Appending keeps
  the rows of a resumed run after those written before the interruption.
  """

  def __init__(self, workdir: str, *, enabled: bool):
    self.enabled = enabled
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Writes the scalars of `step` (non-finite values become JSON null)."""
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else None
      self._tb.add_scalar(k, v, int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def progress_bar(total: int, initial: int, *, enabled: bool) -> tqdm.tqdm:
  """A step progress bar; losses and images/s go in its postfix."""
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                   dynamic_ncols=True, desc="train")
