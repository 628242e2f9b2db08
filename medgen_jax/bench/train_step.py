"""Model FLOP utilisation of the jitted GAN training step (G + D, default config).

MFU here = XLA-counted FLOPs of the compiled step / median step time, divided
by the dense matmul throughput measured in the same process (the backend's
practical roofline, `timing.matmul_gflops_per_s`). The batch is synthetic (the
step's cost does not depend on pixel values), so no dataset is built.
`largest_batch` finds the largest batch whose step fits in device memory from
XLA's buffer assignment, compiling but never running the candidates.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from medgen_jax import models as models_lib
from medgen_jax.data import builders_phantom
from medgen_jax.data.info import DatasetInfo
from medgen_jax.train import loop
from medgen_jax.train import state as state_lib
from medgen_jax.train import step as step_lib
from medgen_jax.bench import timing


def phantom_info(data_config) -> DatasetInfo:
  """The phantom DatasetInfo for `data_config`'s modalities, without building it."""
  info = builders_phantom.stored_info(data_config)
  channels = len(tuple(data_config.modalities))
  return dataclasses.replace(info, image_shape=info.spatial_shape + (channels,),
                             modalities=info.modalities[:channels],
                             intensity=info.intensity[:channels])


def synthetic_batch(info: DatasetInfo, batch_size: int, seed: int = 0) -> dict[str, jax.Array]:
  """'image' `[batch, *spatial, C]` uniform in [-1, 1] plus valid conditions `[batch]`."""
  image = jax.random.uniform(jax.random.PRNGKey(seed), (batch_size,) + tuple(info.image_shape),
                             minval=-1.0, maxval=1.0)
  return {"image": image, **state_lib.dummy_conditions(info, batch_size)}


def _step_parts(gan_config):
  """(models, init function, step function with its settings bound, info) of
  `gan_config`'s GAN (`step.trainer_hooks`)."""
  info = phantom_info(gan_config.data)
  generator = models_lib.build_generator(gan_config.model, info)
  discriminator = models_lib.build_discriminator(gan_config.model, info)
  # The condition teacher's forward/backward is part of the step; its
  # weights are not (an untrained one costs the same).
  teacher = loop.build_teacher(gan_config, info, trained=False)
  models = state_lib.make_models(generator, discriminator, gan_config, teacher=teacher)
  hooks = step_lib.trainer_hooks(gan_config, models, info)
  return models, hooks["init_fn"], hooks["step_fn"], info


def step_bytes_fn(gan_config) -> Callable[[int], int]:
  """batch size -> XLA's peak bytes (arguments + outputs + temporaries) of one R1 step.

  The R1 step (double backward through D) is the larger of the two
  executables, so it decides what fits. The models are built once; each
  call compiles the step for abstract state and batch, allocating nothing.
  """
  models, init, step_fn, info = _step_parts(gan_config)
  state = jax.eval_shape(init)
  step = functools.partial(step_fn, models=models, with_r1=gan_config.loss.r1_gamma > 0)

  def step_bytes(batch_size: int) -> int:
    batch = jax.eval_shape(lambda: synthetic_batch(info, batch_size))
    compiled, _ = timing.compile_fn(step, (state, batch))
    return int(timing.xla_peak_bytes(compiled))
  return step_bytes


def largest_batch(bytes_at: Callable[[int], int], budget_bytes: float, *, start: int,
                  multiple: int, cap: int, tries: int = 4) -> int:
  """The largest batch (a multiple of `multiple`, <= `cap`) whose step fits `budget_bytes`.

  Memory is close to fixed + per_example * batch, so two compiles (`start`,
  `2 * start`) give the line; its largest fitting multiple is then checked
  with `bytes_at` and, if XLA's buffer assignment says it does not fit, the
  candidate shrinks in proportion to the overshoot (at most `tries` checks).

  Args:
    bytes_at: batch size -> peak bytes of the step (e.g. `step_bytes_fn(config)`).
    budget_bytes: the memory the step may use.
    start: a batch size that is known to be valid (e.g. the config's).
    multiple: candidates are multiples of this.
    cap: the largest batch to consider.

  Returns:
    The batch size; `start` itself when nothing larger fits.

  Raises:
    ValueError: if even `start` does not fit.
  """
  first = bytes_at(start)
  if first > budget_bytes:
    raise ValueError(f"largest_batch: batch {start} already needs {first / 2**30:.2f} GiB, "
                     f"over the {budget_bytes / 2**30:.2f} GiB budget")
  per_example = max((bytes_at(2 * start) - first) / start, 1.0)
  fixed = first - per_example * start
  candidate = int((budget_bytes - fixed) / per_example)
  for _ in range(tries):
    candidate = min(cap, candidate) // multiple * multiple
    if candidate <= start:
      return start
    used = bytes_at(candidate)
    if used <= budget_bytes:
      return candidate
    # Shrink by the overshoot, and by at least one multiple.
    candidate = min(int(candidate * budget_bytes / used), candidate - multiple)
  return start


def measure_train_step(gan_config, *, warmup: int, repeats: int,
                       matmul_gflops_per_s: float) -> dict[str, Any]:
  """Compiles and times `train_step` of `gan_config`'s generator + discriminator.

  The training loop runs two executables (a static `with_r1` switch), so both
  are compiled and timed; the state is not advanced between calls. The
  reported step time and FLOPs are the average over one lazy-R1 period
  (`loss.r1_every` steps, one of them with R1), which is what training sees.

  Returns:
    dict with step_ms (amortised), step_ms_r1 / step_ms_no_r1, compile_s
    (both executables), flops (amortised XLA count), gflops_per_s, mfu
    (fraction of `matmul_gflops_per_s`), images_per_s, peak_bytes (the larger
    executable), batch_size and the model description.
  """
  models, init, step_fn, info = _step_parts(gan_config)
  state = jax.jit(init)()
  batch = synthetic_batch(info, gan_config.train.batch_size)
  every = int(gan_config.loss.r1_every) if gan_config.loss.r1_gamma > 0 else 0
  measured = {}
  for with_r1 in ((True, False) if every > 1 else (every == 1,)):
    step = functools.partial(step_fn, models=models, with_r1=with_r1)
    compiled, compile_s = timing.compile_fn(step, (state, batch))
    times = timing.time_compiled(compiled, (state, batch), warmup=warmup, repeats=repeats)
    measured[with_r1] = (float(np.median(times)), timing.xla_flops(compiled), compile_s,
                         timing.xla_peak_bytes(compiled) or 0)
  # Per-period weights: 1 R1 step and every-1 plain steps (or all of one kind).
  weights = {True: 1 / every, False: 1 - 1 / every} if every > 1 else {k: 1.0 for k in measured}
  step_ms = sum(weights[k] * m[0] for k, m in measured.items())
  flops = (sum(weights[k] * m[1] for k, m in measured.items())
           if all(m[1] for m in measured.values()) else None)
  rate = flops / (step_ms * 1e-3) / 1e9 if flops else None
  ms = lambda k: round(measured[k][0], 2) if k in measured else None
  return dict(
      step_ms=round(step_ms, 2), step_ms_r1=ms(True), step_ms_no_r1=ms(False),
      r1_every=every, compile_s=round(sum(m[2] for m in measured.values()), 2), flops=flops,
      gflops_per_s=None if rate is None else round(rate, 2),
      mfu=None if rate is None else round(rate / matmul_gflops_per_s, 4),
      images_per_s=round(gan_config.train.batch_size / (step_ms * 1e-3), 1),
      peak_bytes=max(m[3] for m in measured.values()),
      batch_size=int(gan_config.train.batch_size),
      image_shape=list(info.image_shape),
      generator=f"{gan_config.model.generator}/{gan_config.model.variant} "
                f"{gan_config.model.attention}",
      discriminator=gan_config.model.discriminator,
      params=int(sum(x.size for x in jax.tree.leaves((state.g_params, state.d_params)))))
