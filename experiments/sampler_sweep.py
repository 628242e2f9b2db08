r"""Scores a trained generator at several sampler settings: the thin entry point
around `medgen_jax.studies.sampler_sweep.sweep`.

  python -m experiments.sampler_sweep --config configs/phantom_flow.py --workdir runs/flow \
      --steps 8,16,32,64 --guidance 1 --solver euler

One row per combination of --solver, --guidance and --steps (a flag left out
keeps the config's `model.sample_steps` / `solver` / `guidance_scale`). A
GAN run takes no sampler flags and gives one row, its one-step generator:

  python -m experiments.sampler_sweep --config configs/phantom_gan.py --workdir runs/phantom

Every row is scored on the same real splits, extractor, conditions and noise
as `experiments.evaluate` (settings from `config.eval`, e.g.
--config.eval.num_samples=1000). Writes workdir/eval/sampler_sweep.json (or --out NAME) and
prints the table (images/s, network evaluations per image, FD, recall, ...).
"""
import itertools
import os

from absl import app, flags
from ml_collections import config_flags

from medgen_jax.studies import sampler_sweep

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config of the run (configs/phantom_flow.py[:variant]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints/.")
_STEPS = flags.DEFINE_list("steps", None, "Solver steps, e.g. 8,16,32,64.")
_GUIDANCE = flags.DEFINE_list("guidance", None, "Guidance scales, e.g. 1,2 (1 = off).")
_SOLVER = flags.DEFINE_list("solver", None, "ODE solvers: euler, heun.")
_OUT = flags.DEFINE_string("out", "sampler_sweep.json",
                           "File name under workdir/eval/ (keeps several sweeps apart).")
flags.mark_flags_as_required(["config", "workdir"])


def _parse(name: str, values: list[str] | None, kind) -> list:
  try:
    return [kind(v) for v in values] if values else [None]
  except ValueError as e:
    raise app.UsageError(f"--{name}: {e}") from e


def settings_from_flags(steps, guidance, solver) -> list[dict]:
  """Every combination of the given lists; a list left out is not in the settings."""
  grid = itertools.product(_parse("solver", solver, str),
                           _parse("guidance", guidance, float),
                           _parse("steps", steps, int))
  return [{k: v for k, v in zip(("solver", "guidance_scale", "sample_steps"), combo)
           if v is not None} for combo in grid]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  settings = settings_from_flags(_STEPS.value, _GUIDANCE.value, _SOLVER.value)
  if os.path.basename(_OUT.value) != _OUT.value or not _OUT.value.endswith(".json"):
    raise app.UsageError(f"--out {_OUT.value!r} must be a plain file name ending in .json")
  result = sampler_sweep.sweep(_CONFIG.value, _WORKDIR.value, settings, out_name=_OUT.value)
  print(f"checkpoint step {result['checkpoint_step']}, {result['num_samples']} samples, "
        f"seed {result['seed']}, {result['backend']}")
  print(sampler_sweep.table(result), end="")
  print(os.path.join(_WORKDIR.value, "eval", _OUT.value))


if __name__ == "__main__":
  app.run(main)
