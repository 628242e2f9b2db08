"""Evaluation settings: every key of `config.eval`, its default and its checks.

The training configs carry all of them (`configs/common.py` builds the
section from `DEFAULTS`), so each is visible in the config file and can be
overridden on the command line (`--config.eval.max_test=100`). A config
without an `eval` section, or with a partial one, gets the defaults.
"""
from __future__ import annotations

from typing import Any

from medgen_jax import classifier
from medgen_jax.inference import selection

# The domain extractor's recipe: `classifier.Recipe`'s fields as
# `extractor_<field>` (its defaults are this recipe's), `max_train` unprefixed
# (it also caps the real train split the metrics read).
_RECIPE = {k: v for k, v in classifier.section_values().items() if k != "fields"}

DEFAULTS: dict[str, Any] = dict(
    num_samples=None,          # None: as many as the real test split
    seed=0,                    # noise and condition draws
    generate_batch_size=64,
    extractor_path=None,       # None: a cache dir keyed by dataset identity and recipe
    **{f"extractor_{k}": v for k, v in _RECIPE.items() if k != "max_train"},
    max_train=None,            # cap on real train images (None: all)
    max_test=None,             # cap on real test images (None: all)
    prdc_k=5,
    kid_subsets=100,
    kid_subset_size=1000,      # capped at half the smaller set (32 for 64 volumes)
    bootstrap_resamples=50,
    # Memorisation threshold: max(median - k * 1.4826 * MAD, min_fraction *
    # median) of the test-to-train nearest distances.
    memorization_mad_k=4.0,
    memorization_min_fraction=0.1,
    num_pairs=8,
    # At most this many requests are redrawn with one condition switched
    # (`eval.condition_effect`); 0 turns the diagnosis off.
    condition_effect_samples=32,
    grid_cols=8,
    figures=True,
)


def eval_settings(config: Any) -> dict[str, Any]:
  """`DEFAULTS` overridden by `config.eval` (absent or partial is fine).

  Raises:
    ValueError: an unknown key or a value out of range, naming the field.
  """
  given = config.get("eval", None) if hasattr(config, "get") else None
  given = dict(given or {})
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.eval has unknown fields {unknown}; known: "
                     f"{sorted(DEFAULTS)}")
  s = {**DEFAULTS, **given}
  if s["num_samples"] is not None and int(s["num_samples"]) < 2:
    raise ValueError(f"eval.num_samples must be >= 2 (or None), got "
                     f"{s['num_samples']}")
  for key in ("generate_batch_size", "prdc_k", "kid_subsets", "num_pairs", "grid_cols"):
    if int(s[key]) < 1:
      raise ValueError(f"eval.{key} must be >= 1, got {s[key]}")
  if int(s["condition_effect_samples"]) < 0:
    raise ValueError(f"eval.condition_effect_samples must be >= 0, got "
                     f"{s['condition_effect_samples']}")
  if int(s["kid_subset_size"]) < 2:
    raise ValueError(f"eval.kid_subset_size must be >= 2, got {s['kid_subset_size']}")
  if float(s["memorization_mad_k"]) < 0.0:
    raise ValueError(f"eval.memorization_mad_k must be >= 0, got "
                     f"{s['memorization_mad_k']}")
  if not 0.0 < float(s["memorization_min_fraction"]) < 1.0:
    raise ValueError(f"eval.memorization_min_fraction must be in (0, 1), got "
                     f"{s['memorization_min_fraction']}")
  s["extractor_widths"] = tuple(int(w) for w in s["extractor_widths"])
  check_independent(config, extractor_recipe(s), "eval.extractor_seed")
  return s


def extractor_recipe(settings: Any) -> classifier.Recipe:
  """The domain extractor's `classifier.Recipe` from eval settings (or `config.eval`)."""
  return classifier.from_section(settings, prefix="extractor_", unprefixed=("max_train",),
                                 name="eval.extractor_*")


def check_independent(config: Any, recipe: classifier.Recipe, name: str) -> None:
  """An evaluation classifier (`name`: 'eval.extractor', 'judge') must not
  share its seed with the network the samples were trained against
  (`config.teacher`) or selected by (`config.selector`)."""
  if not hasattr(config, "get"):
    return
  loss = config.get("loss") or {}
  used = {"teacher": config.get("teacher") is not None
                     and loss.get("teacher_weight", 0.0) != 0.0,
          "selector": config.get("selector") is not None
                      and selection.num_candidates(config) > 1}
  for use, on in used.items():
    if on and classifier.from_section(config[use], name=use).seed == recipe.seed:
      raise ValueError(f"{use}.seed {config[use].seed} must differ from "
                       f"{name} {recipe.seed}: the evaluation would judge "
                       f"with the network the samples were made with")
