"""Best-of-K sampling: keep the noise draw the condition selector reads best.

A GAN generator call is cheap (hundreds of images per second on a CPU), so
a sampler can draw K candidates for every requested condition tuple and
keep, per request, the candidate whose frozen condition classifier loss
(the selector, `config.selector`) is lowest: rejection sampling towards the
request, with no gradient through the classifier, so the generator cannot
be pushed to fool it.

    z_k = make_noise(candidate_seed(seed, k), n)   k = 0 .. K-1
    keep, per example i, argmin_k selector_loss(G(z_k)_i, conditions_i)

Candidate 0 uses `seed` itself, so K = 1 is plain sampling. Set with
`config.selector.candidates` (1 = off); the selector's recipe is the rest of
that section (`medgen_jax.classifier.Recipe`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from medgen_jax import classifier

DrawFn = Callable[[int], np.ndarray]                                 # seed -> [n, ...]
ScoreFn = Callable[[np.ndarray, Mapping[str, np.ndarray]], np.ndarray]  # -> [n]


def num_candidates(config: Any) -> int:
  """`config.selector.candidates` (no selector section = 1), checked before any work.

  Raises:
    ValueError: not an integer >= 1.
  """
  section = config.get("selector")
  value = 1 if section is None or section.get("candidates") is None else section.candidates
  if int(value) != value or int(value) < 1:
    raise ValueError(f"selector.candidates must be an integer >= 1 (1 = off), "
                     f"got {value!r}")
  return int(value)


def candidate_seed(seed: int, k: int) -> int:
  """Noise seed of candidate k: `seed` for k = 0, a derived stream otherwise."""
  if k == 0:
    return int(seed)
  return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0] % (2 ** 31))


def best_of(draw: DrawFn, score: ScoreFn, conditions: Mapping[str, np.ndarray],
            seed: int, candidates: int) -> tuple[np.ndarray, np.ndarray]:
  """(images, chosen candidate index per example) of best-of-`candidates`.

  Args:
    draw: noise seed -> `[n, *spatial, C]` images for `conditions`.
    score: (images, conditions) -> `[n]` loss; lower = closer to the request.
    conditions: name -> `[n]` requested conditions.
    seed: noise seed of candidate 0.
    candidates: K >= 1. Candidates are drawn one set at a time, so memory
      stays that of two image sets whatever K is.

  Ties keep the earlier candidate.
  """
  if int(candidates) < 1:
    raise ValueError(f"best_of: candidates must be >= 1, got {candidates}")
  best = np.array(draw(candidate_seed(seed, 0)))
  chosen = np.zeros(len(best), np.int32)
  if candidates == 1:
    return best, chosen
  best_loss = np.asarray(score(best, conditions), np.float64)
  for k in range(1, int(candidates)):
    images = draw(candidate_seed(seed, k))
    loss = np.asarray(score(images, conditions), np.float64)
    better = loss < best_loss
    best[better] = images[better]
    best_loss = np.where(better, loss, best_loss)
    chosen[better] = k
  return best, chosen


def condition_scorer(selector: tuple[Any, Any], *, batch_size: int = 64) -> ScoreFn:
  """(images, conditions) -> `[n]` summed per-example loss of a condition classifier.

  The same per-field losses the training run's teacher term uses
  (`classifier.per_example_condition_loss`: cross-entropy for categorical
  fields, squared error in [0, 1] units for continuous ones), summed over the
  fields `selector` (`(FeatureNet, params)`) reads; an unknown requested value (-1 / NaN) adds 0.
  Batches of `batch_size` under one jit (the last one padded).
  """
  model, params = selector
  fields = tuple(model.fields)

  @jax.jit
  def batch_loss(images, cond):
    _, heads = model.apply({"params": params}, images)
    targets = classifier.condition_targets(cond, fields)
    total = jnp.zeros(images.shape[:1], jnp.float32)
    for f in fields:
      loss, _ = classifier.per_example_condition_loss(f.kind, heads[f.name],
                                                      targets[f.name])
      total = total + loss
    return total

  def score(images: np.ndarray, conditions: Mapping[str, np.ndarray]) -> np.ndarray:
    missing = [f.name for f in fields if f.name not in conditions]
    if missing:
      raise ValueError(f"condition_scorer: conditions {missing} missing; got "
                       f"{sorted(conditions)}")
    n = len(images)
    pad = (-n) % batch_size
    images = np.concatenate([images, np.repeat(images[-1:], pad, 0)]) if pad else images
    cond = {f.name: np.asarray(conditions[f.name]) for f in fields}
    if pad:
      cond = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in cond.items()}
    out = [np.asarray(batch_loss(images[i:i + batch_size],
                                 {k: v[i:i + batch_size] for k, v in cond.items()}))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)[:n]

  return score
