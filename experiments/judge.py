r"""Reads the real test split with a generation config's condition judge.

  python -m experiments.judge --config configs/phantom_3d.py

The judge (`config.judge`) is trained on first use and cached, as in
`experiments.evaluate`, which then reuses it. Prints one JSON line: what the
judge was trained on, and its per-condition accuracy (per class, confusion
rows, chance) or MAE on the held-out real subjects: how far any judge
reading of generated images can be trusted. See medgen_jax/studies/probe.py.
"""
import json

from absl import app
from ml_collections import config_flags

from medgen_jax.studies import probe

_CONFIG = config_flags.DEFINE_config_file("config", None, "A generation config.",
                                          lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(json.dumps(probe.probe_judge(_CONFIG.value), sort_keys=True))


if __name__ == "__main__":
  app.run(main)
