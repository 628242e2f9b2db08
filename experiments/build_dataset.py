r"""Builds a dataset and writes DATA_DIR/summary.json.

  python -m experiments.build_dataset --config configs/data_folder.py \
      --config.source_dir=DIR --config.data_dir=OUT \
      [--config.mode=2d|3d] [--config.modalities=t1,t2] [--config.labels_csv=CSV]
  python -m experiments.build_dataset --config configs/data_phantom.py \
      --config.data_dir=OUT
"""
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from medgen_jax import data
from medgen_jax.data import builders

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset exists.")


def main(argv):
  del argv
  config = _CONFIG.value
  summary = data.build(config, overwrite=flags.FLAGS.overwrite)
  out = builders.data_dir(config)
  os.makedirs(out, exist_ok=True)
  text = json.dumps(summary, indent=2, sort_keys=True)
  with open(os.path.join(out, "summary.json"), "w") as f:
    f.write(text + "\n")
  logging.info("wrote %s", os.path.join(out, "summary.json"))
  print(text)


if __name__ == "__main__":
  app.run(main)
