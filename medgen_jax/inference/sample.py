"""Sampling from a trained run: EMA generator -> NIfTI in physical units + grid + JSON.

    summary = sample(config, workdir, num_samples=64, out_dir=..., condition='lesion=large,age=70')

Order of work, cheapest checks first: the `--condition` string is parsed and
validated against `DatasetInfo.conditions` (unknown field, unknown class,
out-of-range value -> one ValueError) and the checkpoint directory is checked
BEFORE the model is built or anything is compiled.

Conditions not given on the command line are drawn per image uniformly over
the field's support (`unspecified='uniform'`, the default: the samples cover
the data's range) or set to unknown (`unspecified='unknown'`: -1 / NaN, the
model's learned null embedding, i.e. the marginal the generator learned with
condition dropout).

Generation runs in fixed-size batches under one `jax.jit` (the last batch is
padded), so there is exactly one compilation. Latency: `compile_s` is the
first call (trace + compile + run), `ms_per_image` the steady-state time per
image measured on the following calls (one warm-up batch first), both with
`block_until_ready`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from medgen_jax import classifier
from medgen_jax import data as data_lib
from medgen_jax import models
from medgen_jax import viz
from medgen_jax.data.info import CATEGORICAL, DatasetInfo, uniform_conditions
from medgen_jax.inference import nifti
from medgen_jax.inference import quantize
from medgen_jax.inference import selection
from medgen_jax.train import checkpoint as ckpt_lib
from medgen_jax.train.state import dummy_conditions

UNSPECIFIED = ("uniform", "unknown")


def parse_condition_string(text: str | None, info: DatasetInfo) -> dict[str, float | int]:
  """'lesion=large,age=70,site=1' -> {'lesion': 2, 'age': 70.0, 'site': 1}.

  Raises:
    ValueError: malformed item, unknown or repeated field, unknown class or
      value outside the field's range (from `ConditionField.parse`).
  """
  out: dict[str, float | int] = {}
  names = [f.name for f in info.conditions]
  for item in (text or "").split(","):
    item = item.strip()
    if not item:
      continue
    if item.count("=") != 1:
      raise ValueError(f"--condition item {item!r} must look like name=value "
                       f"(fields: {names})")
    name, value = (s.strip() for s in item.split("="))
    if name not in names:
      raise ValueError(f"--condition: dataset {info.name!r} has no condition "
                       f"{name!r}; it has {names}")
    if name in out:
      raise ValueError(f"--condition: {name!r} given twice")
    out[name] = info.condition(name).parse(value)
  return out


def build_conditions(requested: Mapping[str, float | int], info: DatasetInfo, n: int, *,
                     seed: int, unspecified: str = "uniform") -> dict[str, np.ndarray]:
  """Condition arrays `{name: [n]}`: requested values fixed, the others per `unspecified`."""
  if unspecified not in UNSPECIFIED:
    raise ValueError(f"unspecified must be one of {UNSPECIFIED}, got {unspecified!r}")
  drawn = uniform_conditions(info, np.random.default_rng(seed), n)
  out = {}
  for f in info.conditions:
    dtype = np.int32 if f.kind == CATEGORICAL else np.float32
    if f.name in requested:
      out[f.name] = np.full(n, requested[f.name], dtype)
    elif unspecified == "uniform":
      out[f.name] = drawn[f.name].astype(dtype)
    else:
      out[f.name] = np.full(n, -1 if f.kind == CATEGORICAL else np.nan, dtype)
  return out


def make_noise(seed: int, n: int, latent_dim: int, *, truncation_psi: float = 1.0
               ) -> np.ndarray:
  """`[n, latent_dim]` standard normal noise; image i's noise does not depend on n's batching.

  `truncation_psi` < 1 scales the noise towards its mean, 0 (the truncation
  trick, in z space: StyleGAN truncates towards the mean style instead):
  samples move towards the generator's most typical output, trading variety
  for fidelity. 1 leaves the noise as drawn.
  """
  if not 0.0 <= truncation_psi <= 1.0:
    raise ValueError(f"truncation_psi must be in [0, 1], got {truncation_psi}")
  z = jax.random.normal(jax.random.PRNGKey(seed), (n, latent_dim))
  return np.asarray(truncation_psi * z, np.float32)


def interpolation_noise(seed: int, rows: int, cols: int, latent_dim: int) -> np.ndarray:
  """`[rows * cols, latent_dim]`: each row walks from one noise draw to another.

  Spherical interpolation keeps every point at the norm typical of a
  Gaussian draw (a straight line would pass through low-norm noise the
  generator rarely saw).
  """
  a, b = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (2, rows, latent_dim)),
                    np.float64)
  t = np.linspace(0.0, 1.0, cols)
  out = slerp(a[:, None], b[:, None], t[None, :, None])  # [rows, cols, latent]
  return out.reshape(rows * cols, latent_dim).astype(np.float32)


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Spherical interpolation (sin((1-t)W) a + sin(tW) b) / sin(W), W = angle(a, b).

  Broadcasts over leading axes; vectors on the last axis.
  """
  cos = np.sum(a * b, -1, keepdims=True) / (
      np.linalg.norm(a, axis=-1, keepdims=True) * np.linalg.norm(b, axis=-1, keepdims=True))
  omega = np.arccos(np.clip(cos, -1.0, 1.0))
  return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def restore_ema_generator(config: Any, workdir: str, info: DatasetInfo
                          ) -> tuple[Any, Any, int]:
  """(generator, EMA params, step) of the newest checkpoint in `workdir`.

  Only `ema_params` is read from the TrainState (`checkpoint.restore_fields`),
  so the discriminator and optimiser states are never loaded.

  Raises:
    FileNotFoundError: no checkpoint under `workdir/checkpoints`.
    ValueError: the checkpoint was written by a different model.
  """
  generator = models.build_generator(config.model, info)
  abstract = jax.eval_shape(lambda: generator.init(
      jax.random.PRNGKey(0), jnp.zeros((1, int(config.model.latent_dim))),
      dummy_conditions(info, 1), train=False))["params"]
  fields, step = ckpt_lib.restore_fields(workdir, {"ema_params": abstract},
                                         keep=int(config.train.keep_checkpoints))
  return generator, fields["ema_params"], step


def generate(prepared: quantize.PreparedGenerator, z: np.ndarray,
             conditions: Mapping[str, np.ndarray], *, batch_size: int
             ) -> tuple[np.ndarray, dict[str, float]]:
  """Images for every row of `z` / `conditions`, in fixed-size batches.

  Args:
    prepared: generator at some precision (`quantize.prepare`).
    z: `[N, latent_dim]` noise.
    conditions: `{name: [N]}`.
    batch_size: compiled batch size (the last batch is padded).

  Returns:
    (images `[N, *spatial, C]` float32 in [-1, 1], latency dict with
    compile_s, ms_per_image, batch_size, num_batches, backend).
  """
  n = z.shape[0]
  chex.assert_rank(z, 2)
  for name, v in conditions.items():
    if np.shape(v) != (n,):
      raise ValueError(f"condition {name!r} has shape {np.shape(v)}, expected ({n},)")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  bs = min(batch_size, n)
  fn = jax.jit(prepared.apply)
  num_batches = math.ceil(n / bs)

  def batch(i):
    sl = slice(i * bs, (i + 1) * bs)
    pad = bs - z[sl].shape[0]
    padded = lambda x: np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
    return jnp.asarray(padded(z[sl])), {k: jnp.asarray(padded(np.asarray(v)[sl]))
                                        for k, v in conditions.items()}, pad

  t0 = time.perf_counter()
  zb, cb, _ = batch(0)
  jax.block_until_ready(fn(prepared.params, zb, cb))
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(fn(prepared.params, zb, cb))  # warm-up
  outputs, run_s = [], 0.0
  for i in range(num_batches):
    zb, cb, pad = batch(i)
    t = time.perf_counter()
    out = jax.block_until_ready(fn(prepared.params, zb, cb))
    run_s += time.perf_counter() - t
    out = np.asarray(out)
    outputs.append(out[:bs - pad] if pad else out)
  latency = dict(compile_s=compile_s, ms_per_image=1e3 * run_s / (num_batches * bs),
                 batch_size=bs, num_batches=num_batches, backend=jax.default_backend())
  return np.concatenate(outputs), latency


def selection_scorer(config: Any, info: DatasetInfo, *, batch_size: int = 64
                     ) -> tuple[int, selection.ScoreFn | None]:
  """(K, score) of `selector.candidates`; score is None for plain sampling.

  The scorer is the condition classifier of `config.selector`'s recipe
  (`selector.fields`, comma separated; '' = every condition), trained once
  and cached (`classifier.get_classifier`). A dataset without conditions
  has nothing to select on and samples plainly.

  Raises:
    ValueError: a bad K (`selection.num_candidates`), or selector.fields
      naming a condition the dataset does not have.
  """
  candidates = selection.num_candidates(config)
  if candidates == 1 or not info.conditions:
    return 1, None
  recipe = classifier.from_section(config.selector, name="selector")
  known = [f.name for f in info.conditions]
  unknown = [n for n in recipe.fields if n not in known]
  if unknown:
    raise ValueError(f"selector.fields names {unknown}, not conditions of the "
                     f"dataset {known}")
  model, params, meta = classifier.get_classifier(recipe, config.data, info)
  logging.info("best-of-%d selector %s (%s)", candidates, meta["path"],
               "reused" if meta["reused"] else "trained")
  return candidates, selection.condition_scorer((model, params), batch_size=batch_size)


def generator_fn(config: Any, workdir: str, info: DatasetInfo, *, precision: str = "fp32",
                 batch_size: int = 64) -> tuple[Callable[[Mapping[str, np.ndarray], int],
                                                        np.ndarray], int]:
  """(generate(conditions, seed, num=None) -> images `[N, *spatial, C]` in [-1, 1], step).

  For the evaluation suite: the latest EMA generator at `precision`. N is
  the length of the condition arrays, or `num` for an unconditional model
  (empty `conditions`). With `selector.candidates` K > 1 each image is
  the best of K noise draws by the condition selector
  (`selection.best_of`).
  """
  candidates, score = selection_scorer(config, info, batch_size=batch_size)
  generator, params, step = restore_ema_generator(config, workdir, info)
  latent = int(config.model.latent_dim)
  prepared = quantize.prepare_for_sampling(generator, params, precision, info=info,
                                           batch_size=batch_size, latent_dim=latent)

  def run(conditions: Mapping[str, np.ndarray], seed: int,
          num: int | None = None) -> np.ndarray:
    n = len(next(iter(conditions.values()))) if conditions else int(num or 0)
    if n < 1:
      raise ValueError("generate: give conditions, or num for an unconditional model")
    draw = lambda s: generate(prepared, make_noise(s, n, latent), conditions,
                              batch_size=batch_size)[0]
    if score is None:
      return draw(seed)
    return selection.best_of(draw, score, conditions, seed, candidates)[0]
  return run, step


def _json_conditions(conditions: Mapping[str, np.ndarray], info: DatasetInfo) -> dict:
  out = {}
  for f in info.conditions:
    v = np.asarray(conditions[f.name])
    if f.kind == CATEGORICAL:
      out[f.name] = [int(x) if x >= 0 else None for x in v]
    else:
      out[f.name] = [float(x) if np.isfinite(x) else None for x in v]
  return out


def sample(config: Any, workdir: str, *, num_samples: int, out_dir: str,
           condition: str | None = None, precision: str = "fp32", seed: int = 0,
           batch_size: int = 16, unspecified: str = "uniform", ct_window: str = "lung",
           calibration_batches: int = 0, truncation_psi: float = 1.0,
           interpolate: int = 0) -> dict[str, Any]:
  """Generates `num_samples` images and writes them under `out_dir`.

  Writes `sample_0000.nii.gz`, ... (physical units, spacing and, where the
  dataset recorded one, the scanner affine of the training data),
  `grid.png` (CT in `ct_window`, via `medgen_jax.viz`) and `samples.json`
  (the returned summary).

  Args:
    condition: e.g. 'lesion=large,age=70,site=1' (validated first).
    precision: 'fp32' | 'bf16' | 'int8'.
    unspecified: 'uniform' | 'unknown' for fields not in `condition`.
    calibration_batches: int8 only; > 0 enables static int8 activations.
    truncation_psi: noise scale towards its mean (`make_noise`); 1 = off.
    interpolate: > 0 makes each row of the grid (one condition draw per
      row, `interpolate` columns) walk between two noise draws
      (`interpolation_noise`): what the noise controls. Without it, each
      image is the best of `selector.candidates` draws
      (`selection_scorer`; `latency.ms_per_image_selected` is that cost).

  Raises:
    ValueError: bad condition, precision, num_samples or batch_size.
    FileNotFoundError: no checkpoint.
  """
  if num_samples < 1 or batch_size < 1:
    raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, "
                     f"{batch_size}")
  if precision not in quantize.PRECISIONS:
    raise ValueError(f"unknown precision {precision!r}; expected one of "
                     f"{quantize.PRECISIONS}")
  if unspecified not in UNSPECIFIED:
    raise ValueError(f"unspecified must be one of {UNSPECIFIED}, got {unspecified!r}")
  if ct_window not in viz.CT_WINDOWS:
    raise ValueError(f"unknown ct_window {ct_window!r}; expected one of "
                     f"{sorted(viz.CT_WINDOWS)}")
  info = data_lib.load_info(config.data)
  requested = parse_condition_string(condition, info)
  ckpt_lib.require_checkpoint(workdir)

  if interpolate < 0 or (interpolate and num_samples % interpolate):
    raise ValueError(f"interpolate={interpolate} must be 0 or divide num_samples "
                     f"{num_samples} (one row per interpolation)")
  make_noise(seed, 1, 1, truncation_psi=truncation_psi)  # validates psi before loading
  selection.num_candidates(config)
  conditions = build_conditions(requested, info, num_samples, seed=seed,
                                unspecified=unspecified)
  if interpolate:  # one condition draw per row, repeated along it
    conditions = {k: np.repeat(v[::interpolate], interpolate) for k, v in conditions.items()}
  generator, params, step = restore_ema_generator(config, workdir, info)
  latent = int(config.model.latent_dim)
  prepared = quantize.prepare_for_sampling(
      generator, params, precision, info=info, batch_size=min(batch_size, num_samples),
      latent_dim=latent, calibration_batches=calibration_batches, seed=seed)
  z = (truncation_psi * interpolation_noise(seed, num_samples // interpolate, interpolate,
                                            latent) if interpolate else
       make_noise(seed, num_samples, latent, truncation_psi=truncation_psi))
  images, latency = generate(prepared, z, conditions, batch_size=batch_size)
  candidates, score = ((1, None) if interpolate else
                       selection_scorer(config, info, batch_size=batch_size))
  if score is not None:
    # Best of K draws per image; an interpolation grid shows the noise as it is.
    # Candidate 0 is the draw of `seed` just made (and timed), not redrawn.
    t = time.perf_counter()
    plain = images
    draw = lambda s: plain if s == seed else generate(
        prepared, make_noise(s, num_samples, latent, truncation_psi=truncation_psi),
        conditions, batch_size=batch_size)[0]
    images = selection.best_of(draw, score, conditions, seed, candidates)[0]
    latency["ms_per_image_selected"] = 1e3 * (time.perf_counter() - t) / num_samples

  os.makedirs(out_dir, exist_ok=True)
  physical = info.to_physical(images)
  unit = ",".join(t.unit for t in info.intensity)
  files = []
  for i, image in enumerate(physical):
    name = f"sample_{i:04d}.nii.gz"
    nifti.save_nifti(os.path.join(out_dir, name), image, info.spacing_mm, unit=unit,
                     affine=info.extra.get("affine"))
    files.append(name)
  cols = interpolate or min(8, num_samples)
  rows = max(1, num_samples // cols)
  viz.save_grid(images[:rows * cols], info, os.path.join(out_dir, "grid.png"),
                row_labels=[f"#{r * cols}" for r in range(rows)], ct_window=ct_window,
                title=f"step {step}, {prepared.precision}, seed {seed}")
  summary = dict(
      num_samples=num_samples, seed=seed, checkpoint_step=step,
      precision=prepared.precision, requested=requested, unspecified=unspecified,
      truncation_psi=truncation_psi, interpolate=interpolate,
      select_candidates=candidates,
      conditions=_json_conditions(conditions, info), latency=latency,
      param_bytes=quantize.stored_bytes(prepared)["param_bytes"],
      units=unit, spacing_mm=list(info.spacing_mm), affine=info.extra.get("affine"),
      files=files, grid="grid.png",
      ct_window=ct_window, workdir=os.path.abspath(workdir))
  with open(os.path.join(out_dir, "samples.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
