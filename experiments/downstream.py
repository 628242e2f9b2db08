r"""The clinical downstream experiments: the thin entry point around
`medgen_jax.studies.downstream.run_downstream` (augmentation learning curve) and
`medgen_jax.studies.cross_site.run_cross_site` (unlabelled target site), chosen
by the config's `experiment`.

  python -m experiments.downstream --config configs/downstream_lesion.py \
      --workdir runs/downstream_lesion
  python -m experiments.downstream --config configs/downstream_cross_site.py \
      --workdir runs/downstream_cross_site

The config is checked first; then every generator the experiment uses
(`downstream.generator_runs`) that has not reached its `train.num_steps` is
trained (an interrupted one resumes from its newest checkpoint); then the
experiment runs and writes workdir/results.json and its figure. A generator
run that is preempted stops the experiment before any classifier is trained.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from medgen_jax import data as data_lib
from medgen_jax.studies import cross_site, downstream
from medgen_jax.train import checkpoint as ckpt_lib
from medgen_jax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config (configs/downstream_lesion.py[:quick], "
    "configs/downstream_cross_site.py[:quick]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])

EXPERIMENTS = {"augmentation": (downstream.check_config, downstream.run_downstream),
               "cross_site": (cross_site.check_config, cross_site.run_cross_site)}


def train_missing_generators(config) -> None:
  """Trains every generator of the experiment (`downstream.generator_runs`:
  per real-set size under the leak-free protocol) that is not finished.

  A workdir whose newest checkpoint is short of `train.num_steps` resumes
  there; a preempted run raises, so no study reads a half-trained generator.
  """
  for workdir, generator_config in downstream.generator_runs(config).values():
    if (ckpt_lib.latest_step(workdir) or 0) >= generator_config.train.num_steps:
      continue
    if train_and_evaluate(generator_config, workdir)["preempted"]:
      raise SystemExit(f"generator run {workdir} was preempted before "
                       f"{generator_config.train.num_steps} steps; run the "
                       "experiment again to resume it")


def headline(results) -> dict:
  """Mean macro-F1 per arm (and size or test site), for the console."""
  if "curves" in results:
    return {arm: {n: round(e["macro_f1"]["mean"], 3) for n, e in curve.items()}
            for arm, curve in results["curves"].items()}
  return {arm: {t: round(e["macro_f1"]["mean"], 3) for t, e in tests.items()}
          for arm, tests in results["arms"].items()}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config.experiment not in EXPERIMENTS:
    raise app.UsageError(f"config.experiment {config.experiment!r} is not one of "
                         f"{sorted(EXPERIMENTS)}")
  check, run = EXPERIMENTS[config.experiment]
  check(config, data_lib.load_info(config.data))
  train_missing_generators(config)
  results = run(config, _WORKDIR.value)
  print(json.dumps({"macro_f1_mean": headline(results), "figure": results["figure"]},
                   indent=1))


if __name__ == "__main__":
  app.run(main)
