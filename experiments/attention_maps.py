r"""Renders a generated image's attention maps, rollout and condition-gate map.

  python -m experiments.attention_maps --config configs/phantom_gan.py \
      --workdir runs/phantom --query 40,22 [--out runs/phantom/attention] [--seed 0] \
      [--condition lesion=large]

--query is a pixel (y, x) of the generated image; each layer's map shows the
keys that pixel's token attended to, in the layer's own geometry.
"""
import json
import os

from absl import app, flags
from ml_collections import config_flags

from medgen_jax.inference import attention_maps

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file of the run.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/).")
_QUERY = flags.DEFINE_string("query", None, "Query pixel 'y,x'.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default WORKDIR/attention).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise and condition seed.")
_CONDITION = flags.DEFINE_string("condition", "", "e.g. lesion=large,age=70")
flags.mark_flags_as_required(["config", "workdir", "query"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    query = tuple(int(v) for v in _QUERY.value.split(","))
  except ValueError:
    raise app.UsageError(f"--query must be 'y,x' integers, got {_QUERY.value!r}") from None
  out = _OUT.value or os.path.join(_WORKDIR.value, "attention")
  report = attention_maps.attention_maps(_CONFIG.value, _WORKDIR.value, query=query,
                                         out_dir=out, seed=_SEED.value,
                                         condition=_CONDITION.value)
  print(json.dumps({k: report[k] for k in ("query", "checkpoint_step")}))
  print(f"wrote {len(report['layers'])} layer maps to {out}")


if __name__ == "__main__":
  app.run(main)
