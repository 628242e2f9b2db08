r"""XLA's memory of one training step per attention variant (compiled, not run).

  python -m medgen_jax.bench.step_memory --config configs/phantom_3d.py
  python -m medgen_jax.bench.step_memory --config configs/phantom_3d.py:quick \
      --variants axial,full

The step is lowered on abstract inputs (`jax.eval_shape` of the state, a
ShapeDtypeStruct batch) and compiled for the default backend; XLA's buffer
assignment then states the peak bytes without allocating anything, so full
attention at volume token counts can be measured on a machine where running
it would not fit.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from medgen_jax import data as data_lib
from medgen_jax import models as models_lib
from medgen_jax.attention import ATTENTION_VARIANTS
from medgen_jax.train import loop
from medgen_jax.train import state as state_lib
from medgen_jax.train import step as step_lib
from medgen_jax.train import translation


def shape_info(config: Any):
  """The DatasetInfo of `config.data` at its shapes, without building it.

  The tiny `num_subjects` 1/1/1, 8-pixel version of the dataset is built (or
  read from cache) for its channels, units and conditions; the image shape
  is then set from the config (a model only needs shapes).
  """
  small = copy.deepcopy(config.data)
  with small.unlocked():
    small.image_size = 8
    small.depth = 8
    small.num_subjects = {"train": 1, "validation": 1, "test": 1}
    if "slices_per_subject" in small:
      small.slices_per_subject = 1
  info = data_lib.load_info(small)
  size = int(config.data.image_size)
  spatial = ((int(config.data.depth), size, size) if config.data.mode == "3d"
             else (size, size))
  return dataclasses.replace(info, image_shape=spatial + (info.num_channels,))


def step_memory(config: Any, info=None) -> dict[str, float]:
  """Compiled memory of one train step (jit, single device) for `config`.

  Args:
    config: an experiment config (generation or translation task).
    info: its DatasetInfo; None = `shape_info(config)` (only shapes matter).

  Returns:
    {'peak_bytes', 'temp_bytes', 'argument_bytes', 'output_bytes',
    'alias_bytes'} as reported by `Compiled.memory_analysis()`. On XLA:CPU
    (jax 0.10) 'peak_bytes' came out below 'temp_bytes' (it does not cover
    the temporaries), so 'temp_bytes' is the number to compare there.
  """
  info = shape_info(config) if info is None else info
  translating = config.task == "translation"
  # The condition teacher's pass is part of a generation step (untrained
  # weights: only shapes matter here).
  teacher = None if translating else loop.build_teacher(config, info, trained=False)
  models = state_lib.make_models(models_lib.build_generator(config.model, info),
                                 models_lib.build_discriminator(config.model, info),
                                 config, teacher=teacher)
  hooks = (translation.trainer_hooks if translating else step_lib.trainer_hooks)(
      config, models, info)
  init, step_fn = hooks["init_fn"], hooks["step_fn"]
  state = jax.eval_shape(init)
  b = config.train.batch_size
  batch = {"image": jax.ShapeDtypeStruct((b, *info.image_shape), jnp.float32)}
  for f in info.conditions:
    batch[f.name] = jax.ShapeDtypeStruct(
        (b,), jnp.int32 if f.kind == "categorical" else jnp.float32)
  step = functools.partial(step_fn, models=models)
  compiled = jax.jit(lambda s, x: step(s, x, None, axis_name=None),
                     donate_argnums=0).lower(state, batch).compile()
  m = compiled.memory_analysis()
  return {"peak_bytes": float(m.peak_memory_in_bytes),
          "temp_bytes": float(m.temp_size_in_bytes),
          "argument_bytes": float(m.argument_size_in_bytes),
          "output_bytes": float(m.output_size_in_bytes),
          "alias_bytes": float(m.alias_size_in_bytes)}


def memory_per_attention(config: Any, variants: Sequence[str] = tuple(ATTENTION_VARIANTS),
                         info=None) -> dict[str, dict[str, float]]:
  """`step_memory` with config.model.attention set to each variant."""
  unknown = [v for v in variants if v not in ATTENTION_VARIANTS]
  if unknown:
    raise ValueError(f"unknown attention variants {unknown}; valid: "
                     f"{sorted(ATTENTION_VARIANTS)}")
  info = shape_info(config) if info is None else info
  out = {}
  for name in variants:
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      cfg.model.attention = name
    out[name] = step_memory(cfg, info)
  return out


def format_table(results: dict[str, dict[str, float]], config: Any) -> str:
  """A markdown table: variant, peak and temporary GiB."""
  d = config.data
  shape = (f"{d.depth}x{d.image_size}x{d.image_size}" if d.mode == "3d"
           else f"{d.image_size}x{d.image_size}")
  lines = [f"One training step, batch {config.train.batch_size}, {shape}, model "
           f"{config.model.generator}/{config.model.variant}, "
           f"{jax.default_backend()} (XLA memory_analysis)", "",
           "| attention | temp GiB | arguments + outputs - aliased GiB | XLA peak GiB |",
           "|---|---|---|---|"]
  for name, m in results.items():
    live = m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"]
    lines.append(f"| {name} | {m['temp_bytes'] / 2**30:.3f} | {live / 2**30:.3f} | "
                 f"{m['peak_bytes'] / 2**30:.3f} |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  config = flags.FLAGS.config
  variants = [v for v in flags.FLAGS.variants.split(",") if v]
  print(format_table(memory_per_attention(config, variants), config))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Experiment config.",
                                  lock_config=True)
  flags.DEFINE_string("variants", ",".join(ATTENTION_VARIANTS),
                      "Comma-separated attention variants.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
