"""Attention benchmark entry point (see configs/benchmark_attention.py)."""
from absl import app, flags
from ml_collections import config_flags

from medgen_jax.bench import attention_suite

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where results.json and plots go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  attention_suite.run_benchmark(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
