r"""The data-augmentation experiment: the thin entry point around
`medgen_jax.eval.downstream.run_downstream`.

  python -m experiments.downstream --config configs/downstream_lesion.py \
      --workdir runs/downstream

Generator workdirs without a checkpoint are trained first, each with its
`config.generator_configs[name]`. Writes workdir/results.json and
workdir/results.png.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from medgen_jax import data as data_lib
from medgen_jax.eval.downstream import check_config, run_downstream
from medgen_jax.train import checkpoint as ckpt_lib
from medgen_jax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config (configs/downstream_lesion.py[:quick]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])


def train_missing_generators(config) -> None:
  """Trains every generator of `config.generators` whose workdir has no checkpoint."""
  for name, workdir in config.generators.items():
    if ckpt_lib.latest_step(workdir) is None:
      train_and_evaluate(config.generator_configs[name], workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  check_config(_CONFIG.value, data_lib.load_info(_CONFIG.value.data))
  train_missing_generators(_CONFIG.value)
  results = run_downstream(_CONFIG.value, _WORKDIR.value)
  print(json.dumps({arm: {m: (round(e[m]["mean"], 4), round(e[m]["std"], 4))
                          for m in ("macro_f1", "accuracy")}
                    for arm, e in results["arms"].items()}, indent=1))


if __name__ == "__main__":
  app.run(main)
