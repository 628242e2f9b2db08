r"""Trains a conditional GAN: the thin entry point around `train_and_evaluate`.

  python -m experiments.train --config configs/phantom_gan.py --workdir runs/phantom
  python -m experiments.train --config configs/phantom_gan.py:quick --workdir /tmp/q \
      --config.model.attention=axial --config.train.num_steps=200

Re-running with the same --workdir resumes from its newest checkpoint.
"""
from absl import app, flags
from ml_collections import config_flags

from medgen_jax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/phantom_gan.py[:variant]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, logs, samples).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print({k: summary[k] for k in ("steps", "wall_time_s", "images_per_s", "last_losses")})


if __name__ == "__main__":
  app.run(main)
