r"""Collapse diagnostics of a trained generation run: where the noise is lost, and D's
train / held-out gap. Writes WORKDIR/eval/diagnostics.json.

  python -m experiments.diagnose --config configs/phantom_gan.py --workdir runs/phantom
"""
import json
import os

from absl import app, flags
from ml_collections import config_flags

from medgen_jax.studies import diagnostics

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file of the run.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/).")
_NUM_NOISE = flags.DEFINE_integer("num_noise", 16, "Noise draws per condition class.")
_NUM_REAL = flags.DEFINE_integer("num_real", 256, "Real train / test images scored by D.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = diagnostics.diagnose_run(_CONFIG.value, _WORKDIR.value, num_noise=_NUM_NOISE.value,
                                 num_real=_NUM_REAL.value)
  path = os.path.join(_WORKDIR.value, "eval", "diagnostics.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  app.run(main)
