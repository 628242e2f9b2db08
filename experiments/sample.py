r"""Samples a trained run: NIfTI in physical units, a PNG grid and samples.json.

  python -m experiments.sample --config configs/phantom_gan.py --workdir runs/phantom \
      --num_samples 64 --out runs/phantom/samples \
      [--condition lesion=large,age=70,site=1] [--precision fp32|bf16|int8] [--seed 0]
      [--truncation_psi 0.7] [--interpolate 8]
  python -m experiments.sample --config ... --workdir ... --out DIR --compare_precisions

Fields missing from --condition are drawn uniformly over their range
(--unspecified=uniform) or set to unknown (--unspecified=unknown). With
--compare_precisions, fp32 / bf16 / int8 are compared on the same noise and
conditions and DIR/precision_table.{json,md} are written instead.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from medgen_jax.studies import precision
from medgen_jax.inference import quantize, sample

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file of the run.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_NUM = flags.DEFINE_integer("num_samples", 64, "Images to generate.")
_CONDITION = flags.DEFINE_string("condition", "", "e.g. lesion=large,age=70,site=1")
_PRECISION = flags.DEFINE_enum("precision", "fp32", list(quantize.PRECISIONS),
                               "Generator precision.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise and condition seed.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Compiled batch size.")
_UNSPECIFIED = flags.DEFINE_enum("unspecified", "uniform", list(sample.UNSPECIFIED),
                                 "Fields not in --condition: uniform draw or unknown.")
_WINDOW = flags.DEFINE_string("ct_window", "lung", "CT display window of the grid.")
_CALIB = flags.DEFINE_integer("calibration_batches", 0,
                              "int8: >0 also quantizes activations (static ranges).")
_PSI = flags.DEFINE_float("truncation_psi", 1.0,
                          "Noise scaled towards its mean (1 = off; < 1 less variety).")
_INTERP = flags.DEFINE_integer("interpolate", 0,
                               ">0: each grid row walks between two noise draws in this "
                               "many columns, one condition per row.")
_COMPARE = flags.DEFINE_bool("compare_precisions", False,
                             "Write the fp32/bf16/int8 precision table instead.")
flags.mark_flags_as_required(["config", "workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _COMPARE.value:
    precision.compare_precisions(_CONFIG.value, _WORKDIR.value, _OUT.value,
                                 num_samples=_NUM.value, seed=_SEED.value,
                                 batch_size=_BATCH.value)
    print(open(f"{_OUT.value}/precision_table.md").read())
    return
  summary = sample.sample(
      _CONFIG.value, _WORKDIR.value, num_samples=_NUM.value, out_dir=_OUT.value,
      condition=_CONDITION.value, precision=_PRECISION.value, seed=_SEED.value,
      batch_size=_BATCH.value, unspecified=_UNSPECIFIED.value, ct_window=_WINDOW.value,
      calibration_batches=_CALIB.value, truncation_psi=_PSI.value,
      interpolate=_INTERP.value)
  print(json.dumps({k: summary[k] for k in ("checkpoint_step", "precision", "latency")}))


if __name__ == "__main__":
  app.run(main)
