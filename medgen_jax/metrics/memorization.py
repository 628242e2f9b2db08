"""Memorisation audit: are generated samples copies of training images?

For every generated sample we find its nearest real training image, in a
feature space (domain extractor features) and in pixel space, and compare
those distances with the same distances from held-out real test images to
the training set. A test image is a new patient; the threshold is a robust
low bound of the test-to-train distances, `max(median - k * 1.4826 * MAD,
min_fraction * median)`, so near-copies among the test images do not pull it
to 0 and a small test set (64 volumes) does not reduce it to its smallest
distance. A generated sample closer than that is flagged as a likely copy
(a privacy leak for patient data).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure  # Agg canvas, no pyplot state

from medgen_jax.metrics import distances


def _flatten(name: str, x) -> np.ndarray:
  x = np.asarray(x)
  x = x if x.dtype == np.float64 else x.astype(np.float32)
  if x.ndim < 2:
    raise ValueError(f"{name} must be [num_samples, ...], got shape {x.shape}")
  return x.reshape(x.shape[0], -1)


MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its std


def robust_threshold(test_to_train, *, mad_k: float = 4.0,
                     min_fraction: float = 0.1) -> float:
  """`max(median - mad_k * 1.4826 * MAD, min_fraction * median)` of `[n]` distances."""
  d = np.asarray(test_to_train, np.float64).reshape(-1)
  med = float(np.median(d))
  mad = float(np.median(np.abs(d - med)))
  return max(med - mad_k * MAD_TO_STD * mad, min_fraction * med)


def memorization_audit(generated, train, test, *, mad_k: float = 4.0,
                       min_fraction: float = 0.1,
                       chunk_size: int = 512) -> dict[str, np.ndarray | float | str]:
  """Nearest-training-neighbour audit in one space (features or pixels).

  Distances are taken after centring every set on the train mean.

  Args:
    generated: `[n_gen, ...]` generated samples (features `[n, F]` or images
      `[n, *spatial, C]`; images are flattened).
    train: `[n_train, ...]` real training samples, same trailing shape.
    test: `[n_test, ...]` real held-out samples (>= 2), same trailing shape.
    mad_k: robust standard deviations below the median test distance.
    min_fraction: floor of the threshold as a fraction of that median, in
      (0, 1).
    chunk_size: queries per distance block (10k x 10k images are fine).

  Returns:
    dict with
      'gen_to_train': `[n_gen]` nearest training distance per generated sample,
      'gen_nearest_train': `[n_gen]` index of that training sample,
      'test_to_train': `[n_test]` the real reference distances,
      'threshold': `robust_threshold` of 'test_to_train',
      'memorized_fraction': fraction of generated samples with distance
        strictly below the threshold,
      'test_memorized_fraction': the same fraction for the test set itself
        (the real-vs-real reference, ~0 without test-train near-copies),
      'num_test': number of test references,
      'threshold_rule': the rule and its number of references, as text.
  """
  gen, tr, te = (_flatten(n, x) for n, x in
                 (("generated", generated), ("train", train), ("test", test)))
  for name, x in (("generated", gen), ("test", te)):
    if x.shape[1] != tr.shape[1]:
      raise ValueError(f"{name} has {x.shape[1]} values per sample but train "
                       f"has {tr.shape[1]}")
  if mad_k < 0.0:
    raise ValueError(f"mad_k must be >= 0, got {mad_k}")
  if not 0.0 < min_fraction < 1.0:
    raise ValueError(f"min_fraction must be in (0, 1), got {min_fraction}")
  if te.shape[0] < 2:
    raise ValueError(f"test needs at least 2 samples, got {te.shape[0]}")
  gen_d, gen_i = distances.nearest_neighbors(gen, tr, k=1, chunk_size=chunk_size)
  test_d, _ = distances.nearest_neighbors(te, tr, k=1, chunk_size=chunk_size)
  gen_d, gen_i, test_d = gen_d[:, 0], gen_i[:, 0], test_d[:, 0]
  threshold = robust_threshold(test_d, mad_k=mad_k, min_fraction=min_fraction)
  return {
      "gen_to_train": gen_d,
      "gen_nearest_train": gen_i,
      "test_to_train": test_d,
      "threshold": threshold,
      "memorized_fraction": float(np.mean(gen_d < threshold)),
      "test_memorized_fraction": float(np.mean(test_d < threshold)),
      "num_test": int(te.shape[0]),
      "threshold_rule": (f"max(median - {mad_k:g} * 1.4826 * MAD, "
                         f"{min_fraction:g} * median) of {te.shape[0]} "
                         f"test-to-train nearest distances"),
  }


def closest_pairs(audit: dict, num_pairs: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices (generated `[p]`, train `[p]`) of the `num_pairs` closest pairs."""
  order = np.argsort(audit["gen_to_train"], kind="stable")[:num_pairs]
  return order, np.asarray(audit["gen_nearest_train"])[order]


def save_closest_pairs_png(path: str | os.PathLike, generated, train,
                           audit: dict, *, num_pairs: int = 8,
                           channel: int = 0,
                           titles: Sequence[str] = ("generated", "nearest train")
                           ) -> str:
  """Writes a PNG: top row the closest generated samples, bottom their twins.

  Args:
    path: output .png path (parent directories are created).
    generated: `[n_gen, H, W, C]` or `[n_gen, D, H, W, C]` images (3D shows the
      middle slice of the first spatial axis).
    train: `[n_train, ...]` training images in the same layout.
    audit: the output of `memorization_audit` on these images or features.
    num_pairs: columns in the figure.
    channel: channel to show.
    titles: row labels.

  Returns:
    the path written, as a string.
  """
  generated, train = np.asarray(generated), np.asarray(train)
  if generated.ndim not in (4, 5) or train.ndim != generated.ndim:
    raise ValueError(f"images must be [n, H, W, C] or [n, D, H, W, C]; got "
                     f"{generated.shape} and {train.shape}")
  gi, ti = closest_pairs(audit, num_pairs)
  if len(gi) == 0:
    raise ValueError("audit has no generated samples")

  def view(img):
    img = img[..., channel]
    return img[img.shape[0] // 2] if img.ndim == 3 else img

  fig = Figure(figsize=(1.8 * len(gi), 3.8))
  axes = fig.subplots(2, len(gi), squeeze=False)
  for col, (g, t) in enumerate(zip(gi, ti)):
    for row, img in enumerate((generated[g], train[t])):
      ax = axes[row, col]
      ax.imshow(view(img), cmap="gray")
      ax.set_xticks([])
      ax.set_yticks([])
    axes[0, col].set_title(f"d={audit['gen_to_train'][g]:.3g}", fontsize=8)
  for row, title in enumerate(titles):
    axes[row, 0].set_ylabel(title, fontsize=8)
  fig.suptitle(f"closest pairs; threshold {audit['threshold']:.3g}", fontsize=9)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80, bbox_inches="tight")
  return str(path)
