"""Evaluation settings: every key of `config.eval`, its default and its checks.

The training configs carry all of them (`configs/common.py` builds the
section from `DEFAULTS`), so each is visible in the config file and can be
overridden on the command line (`--config.eval.max_test=100`). A config
without an `eval` section, or with a partial one, gets the defaults.
"""
from __future__ import annotations

from typing import Any

from medgen_jax.train import extractor_cache

DEFAULTS: dict[str, Any] = dict(
    num_samples=None,          # None: as many as the real test split
    seed=0,                    # noise and condition draws
    generate_batch_size=64,
    # The domain extractor's recipe (extractor_*, max_train), shared with the
    # condition teacher.
    **extractor_cache.SETTINGS,
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
  if int(s["kid_subset_size"]) < 2:
    raise ValueError(f"eval.kid_subset_size must be >= 2, got {s['kid_subset_size']}")
  if float(s["memorization_mad_k"]) < 0.0:
    raise ValueError(f"eval.memorization_mad_k must be >= 0, got "
                     f"{s['memorization_mad_k']}")
  if not 0.0 < float(s["memorization_min_fraction"]) < 1.0:
    raise ValueError(f"eval.memorization_min_fraction must be in (0, 1), got "
                     f"{s['memorization_min_fraction']}")
  return extractor_cache.check_settings(s)
