r"""The data-augmentation experiment: the thin entry point around
`medgen_jax.eval.downstream.run_downstream`.

  python -m experiments.downstream --config configs/downstream_lesion.py \
      --workdir runs/downstream

Generator workdirs without a checkpoint are trained first (see the config).
Writes workdir/results.json and workdir/results.png.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from medgen_jax.eval.downstream import run_downstream

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config (configs/downstream_lesion.py[:quick]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  results = run_downstream(_CONFIG.value, _WORKDIR.value)
  print(json.dumps({arm: {m: (round(e[m]["mean"], 4), round(e[m]["std"], 4))
                          for m in ("macro_f1", "accuracy")}
                    for arm, e in results["arms"].items()}, indent=1))


if __name__ == "__main__":
  app.run(main)
