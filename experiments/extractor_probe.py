r"""Trains the domain extractor on real train images, scores it on real test images.

  python -m experiments.extractor_probe --config configs/data_phantom.py \
      --fields lesion --steps 300 --stem_patch 2 --pooling mean_max

Prints one JSON line: per-condition accuracy (and per class) or MAE on the
held-out real subjects, and the training time. See medgen_jax/studies/probe.py.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from medgen_jax.studies import probe

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_FIELDS = flags.DEFINE_list("fields", None, "Conditions to train and score (default: all).")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per step.")
_SEED = flags.DEFINE_integer("seed", 0, "Init and batch-order seed.")
_WIDTHS = flags.DEFINE_list("widths", ["16", "32", "64"], "Channels per stage.")
_STEM = flags.DEFINE_integer("stem_patch", 2, "Space-to-depth factor of the stem.")
_POOLING = flags.DEFINE_enum("pooling", "mean_max", ["mean", "mean_max"], "Global pooling.")


def main(argv):
  del argv
  result = probe.probe_extractor(
      _CONFIG.value, fields=_FIELDS.value, steps=_STEPS.value, batch_size=_BATCH.value,
      seed=_SEED.value, widths=tuple(int(w) for w in _WIDTHS.value),
      stem_patch=_STEM.value, pooling=_POOLING.value)
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
