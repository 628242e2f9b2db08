"""Does the output change when only a condition changes? A diagnosis in numbers.

A generator can score well on fidelity and still ignore a condition. With
the noise held fixed, `condition_effect` redraws the same requests with one
condition switched (every class of a categorical field; the first and third
quarter of a continuous field's `value_range`) and measures how far the
images move, beside how far they move when only the noise is redrawn:

  effect_F = mean over requests and value pairs (a, b) of rms(x_a - x_b)
  noise    = mean over requests of rms(x(z) - x(z')), conditions as requested
  ratio_F  = effect_F / noise

rms is over pixels and channels, in the model's [-1, 1] units. A ratio near
0 says the condition is ignored, whatever a judge reads; a ratio near 1 says
switching it moves an image as much as new noise does. The ratio says
nothing about whether the change is the right one: that is the judge's
reading of the same conditions (`scoring.evaluate_images`).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping

import numpy as np

from medgen_jax.data.info import CATEGORICAL, DatasetInfo

GenerateFn = Callable[..., np.ndarray]  # (conditions, seed) -> [N, *spatial, C]


def switched_values(field) -> tuple[float, ...]:
  """The values a field is switched between: every class of a categorical
  field, the first and third quarter of a continuous field's `value_range`."""
  if field.kind == CATEGORICAL:
    return tuple(range(field.num_classes))
  lo, hi = (float(v) for v in field.value_range)
  return (lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo))


def rms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-image root mean square difference `[N]` of two `[N, ...]` stacks."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return np.sqrt(np.mean(d.reshape(len(d), -1) ** 2, axis=1))


def condition_effect(generate: GenerateFn, requested: Mapping[str, np.ndarray],
                     info: DatasetInfo, *, num: int, seed: int) -> dict[str, float]:
  """How much the images move per condition, against the noise's own spread.

  Args:
    generate: `(conditions, seed) -> images`; one seed gives one noise per
      row whatever the conditions (as `inference.sample.generator_fn`).
    requested: name -> `[N]` condition values (the evaluation's requests).
    info: the dataset, for the conditions' kinds and ranges.
    num: how many of the requests (the first `num`) are redrawn.
    seed: noise seed; `seed + 1` is the second noise.

  Returns:
    `condition_effect_noise`, and per condition F `condition_effect_<F>`
    and `condition_effect_<F>_ratio` (formulas in the module docstring);
    {} for an unconditional dataset.

  Raises:
    ValueError: `num` < 1 or more than the requests.
  """
  if not info.conditions:
    return {}
  total = len(next(iter(requested.values())))
  if not 1 <= num <= total:
    raise ValueError(f"eval.condition_effect_samples must be in [1, {total}] (the "
                     f"requests), got {num}")
  base = {k: np.asarray(v)[:num] for k, v in requested.items()}
  noise = float(np.mean(rms(generate(base, seed), generate(base, seed + 1))))
  out = {"condition_effect_noise": noise}
  for field in info.conditions:
    images = []
    for value in switched_values(field):
      switched = dict(base)
      switched[field.name] = np.full(num, value, base[field.name].dtype)
      images.append(generate(switched, seed))
    effect = float(np.mean([rms(a, b).mean() for a, b in itertools.combinations(images, 2)]))
    out[f"condition_effect_{field.name}"] = effect
    out[f"condition_effect_{field.name}_ratio"] = effect / noise if noise > 0 else float("inf")
  return out
