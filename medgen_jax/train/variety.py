"""Sample variety while training: is the generator collapsing right now?

The measure is the mean L1 distance (model range [-1, 1], per pixel) over
pairs of images that share a condition value. On the EMA sample grid (one row
per class of the grid's condition, columns differing only in noise) it says
how much the noise changes the sample; on the real training batches of the
same run, how much real images of one class differ. A ratio far below 1
while training is mode collapse as it happens; the evaluation's recall says
the same thing after the fact, at a much higher cost.
"""
from __future__ import annotations

import numpy as np


def pair_distance_sums(images: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
  """Sum over same-group pairs i < j of mean |x_i - x_j|, and the pair count.

  Args:
    images: `[N, ...]` float.
    groups: `[N]` group labels (e.g. the lesion class); negative labels
      (unknown) form no pairs.

  Returns:
    (sum of pair distances, number of pairs): sums, so that batches can be
    pooled before dividing.
  """
  flat = np.asarray(images, np.float32).reshape(len(images), -1)
  groups = np.asarray(groups)
  total, count = 0.0, 0
  for g in np.unique(groups[groups >= 0]):
    members = flat[groups == g]
    n = len(members)
    if n < 2:
      continue
    dist = np.abs(members[:, None, :] - members[None, :, :]).mean(-1)  # [n, n]
    total += float(dist[np.triu_indices(n, k=1)].sum())
    count += n * (n - 1) // 2
  return total, count


def mean_pair_distance(images: np.ndarray, groups: np.ndarray) -> float:
  """Mean over same-group pairs of mean |x_i - x_j| (NaN without pairs)."""
  total, count = pair_distance_sums(images, groups)
  return total / count if count else float("nan")


class VarietyMeter:
  """Pools the real reference over the batches a run has seen, and scores
  the EMA sample grid against it.

  Attributes:
    field: the condition that groups images (None: one group).
  """

  def __init__(self, field: str | None):
    self.field = field
    self._real_sum, self._real_pairs = 0.0, 0

  def _groups(self, batch: dict[str, np.ndarray], n: int) -> np.ndarray:
    return np.zeros(n, np.int32) if self.field is None else np.asarray(batch[self.field])

  def add_real(self, batch: dict[str, np.ndarray]) -> None:
    """Adds the same-condition pairs of one host batch ('image' + conditions)."""
    images = batch["image"]
    total, count = pair_distance_sums(images, self._groups(batch, len(images)))
    self._real_sum += total
    self._real_pairs += count

  def score(self, samples: np.ndarray, conditions: dict[str, np.ndarray]) -> dict[str, float]:
    """variety_ema, variety_real and their ratio for one sample grid."""
    fake = mean_pair_distance(samples, self._groups(conditions, len(samples)))
    real = self._real_sum / self._real_pairs if self._real_pairs else float("nan")
    ratio = fake / real if real > 0 else float("nan")
    return dict(variety_ema=fake, variety_real=real, variety_ratio=ratio)
