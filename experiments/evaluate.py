r"""Evaluates the latest checkpoint of a training run: the thin entry point
around `medgen_jax.eval.evaluate.evaluate`.

  python -m experiments.evaluate --config configs/phantom_gan.py --workdir runs/phantom

Writes workdir/eval/metrics.json (flat keys: every metric and its
`*_real_reference`) and workdir/eval/figures/. Evaluation settings come from
`config.eval`, which carries every one of them (defaults and meaning in
medgen_jax/eval/settings.py), so any can be overridden on the command line,
e.g. --config.eval.num_samples=1000 --config.eval.max_test=100.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from medgen_jax.eval.evaluate import evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config of the run (configs/phantom_gan.py[:variant]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints/.")
flags.mark_flags_as_required(["config", "workdir"])

_SHOWN = ("checkpoint_step", "num_samples", "fd_domain", "kid_domain", "precision",
          "recall", "density", "coverage", "lesion_accuracy", "site_accuracy",
          "age_mae", "lesion_diameter_error_mm", "hu_w1", "memorized_fraction",
          "memorized_fraction_pixel")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics = evaluate(_CONFIG.value, _WORKDIR.value)
  rows = {k: (metrics.get(k), metrics.get(f"{k}_real_reference")) for k in _SHOWN
          if k in metrics}
  print(json.dumps(rows, indent=1))


if __name__ == "__main__":
  app.run(main)
