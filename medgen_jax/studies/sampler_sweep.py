"""`sweep(config, workdir, settings)`: one checkpoint scored at several sampler settings.

A flow generator (`models.velocity.FlowGenerator`) samples by integrating an
ODE, and its step count, solver and guidance scale are read from
`config.model` when the module is built, not learned: one trained run can
trade speed for quality without retraining. Each row of the sweep is one
such setting, e.g.

    sweep(config, 'runs/flow', [{'sample_steps': 8}, {'sample_steps': 64,
                                                      'solver': 'heun'}])

and gives images/s, network evaluations per image and the evaluation's
metrics. A GAN run has one row (`[{}]`): its one-step generator, for the
same table.

Every row is scored like `experiments.evaluate` scores the run: the same
real splits, domain extractor, requested conditions and noise
(`reference.load_reference`, loaded once), the fp32 EMA generator (restored
once; the sampler settings only change the module around the params), and
`scoring.evaluate_images` (without figures: no `figures_dir`). The row with the config's own
settings therefore has `experiments.evaluate`'s metrics.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from medgen_jax import models
from medgen_jax.eval import output, reference, scoring
from medgen_jax.eval import settings as settings_lib
from medgen_jax.inference import quantize
from medgen_jax.inference import sample
from medgen_jax.models import ode
from medgen_jax.train import checkpoint as ckpt_lib

SAMPLER_KEYS = ("sample_steps", "solver", "guidance_scale")
# Metrics copied into each row (those the dataset has), and their
# `*_real_reference` into the result's `real_reference`.
METRICS = ("fd_domain", "fd_domain_ci_low", "fd_domain_ci_high", "kid_domain",
           "precision", "recall", "density", "coverage", "hu_w1", "lesion_accuracy",
           "lesion_as_large_given_large", "lesion_as_large_given_none", "site_accuracy",
           "age_mae")
_REFERENCE_METRICS = tuple(k for k in METRICS if "_ci_" not in k)


def network_evals_per_image(sampler: Mapping[str, Any]) -> int:
  """Velocity-network evaluations per generated image; 1 for an empty sampler (a GAN).

  Euler calls the velocity once per step, Heun twice (at t and at the
  Euler prediction's t_next, nothing reused across steps: `models.ode`);
  guidance other than 1 runs the network on the conditional and the null
  conditions of each image (a doubled batch).
  """
  if not sampler:
    return 1
  per_step = 2 if sampler["solver"] == "heun" else 1
  guided = 2 if float(sampler["guidance_scale"]) != 1.0 else 1
  return int(sampler["sample_steps"]) * per_step * guided


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
  return _is_int(v) or isinstance(v, (float, np.floating))


def check_settings(config: Any, settings: Sequence[Mapping[str, Any]]
                   ) -> list[dict[str, Any]]:
  """The sampler of every row: the config's own values overridden by the setting's.

  Returns:
    one dict per setting with every key of `SAMPLER_KEYS` for a flow config,
    `{}` for a GAN.

  Raises:
    ValueError: no settings, a key outside `SAMPLER_KEYS`, a value out of
      range, a sampler setting for a generator without a sampler, or the
      same sampler twice; naming the setting.
  """
  if config.task == "translation":
    raise ValueError("the sampler sweep scores generation runs; a translation run is "
                     "evaluated by experiments.evaluate")
  if not settings:
    raise ValueError("sampler sweep: give at least one setting ({} = the config's own)")
  flow = config.model.generator == "flow"
  out = []
  for i, setting in enumerate(settings):
    where = f"sampler setting {i} {dict(setting)!r}"
    unknown = sorted(set(setting) - set(SAMPLER_KEYS))
    if unknown:
      raise ValueError(f"{where}: unknown keys {unknown}; valid: {list(SAMPLER_KEYS)}")
    if not flow:
      if setting:
        raise ValueError(
            f"{where}: model.generator={config.model.generator!r} samples in one "
            f"step and has no sampler; the only setting is {{}}")
      out.append({})
      continue
    s = {k: setting.get(k, config.model[k]) for k in SAMPLER_KEYS}
    if not _is_int(s["sample_steps"]) or s["sample_steps"] < 1:
      raise ValueError(f"{where}: sample_steps={s['sample_steps']!r} must be an "
                       f"integer >= 1")
    if s["solver"] not in ode.SOLVERS:
      raise ValueError(f"{where}: solver={s['solver']!r} must be one of {ode.SOLVERS}")
    g = s["guidance_scale"]
    if not _is_real(g) or not (math.isfinite(g) and g >= 0):
      raise ValueError(f"{where}: guidance_scale={g!r} must be a finite number >= 0")
    s = dict(sample_steps=int(s["sample_steps"]), solver=str(s["solver"]),
             guidance_scale=float(g))
    if s in out:
      raise ValueError(f"{where}: the sampler {s} is already in the sweep")
    out.append(s)
  return out


def sweep(config: Any, workdir: str, settings: Sequence[Mapping[str, Any]], *,
          out_name: str = "sampler_sweep.json") -> dict[str, Any]:
  """Scores the latest checkpoint in `workdir` at each sampler setting.

  Args:
    config: the run's training config (`configs/phantom_flow.py`, or a GAN's).
    workdir: its training workdir (with `checkpoints/`).
    settings: one dict per row, keys from `SAMPLER_KEYS` overriding
      `config.model`'s; `{}` is the config's own sampler, and a GAN's only row.
    out_name: file name under `workdir/eval/` (several sweeps of one run).

  Returns:
    {'checkpoint_step', 'generator', 'num_samples', 'seed', 'backend',
     'extractor_path', 'rows', 'real_reference'}, also written to
    `workdir/eval/<out_name>`. Each row: the sampler (flow only),
    `network_evals_per_image`, `images_per_s`, `ms_per_image` (steady state),
    `compile_s` (first batch: trace, compile, run) and the `METRICS` the
    dataset has; `real_reference` holds those metrics' `*_real_reference`.

  Raises:
    ValueError: a bad setting (`check_settings`) or eval section, before
      anything is loaded.
    FileNotFoundError: no checkpoint, before anything is loaded.
  """
  samplers = check_settings(config, settings)
  s = settings_lib.eval_settings(config)
  ckpt_lib.require_checkpoint(workdir)
  ref = reference.load_reference(config, s)
  info, bs = ref.info, int(s["generate_batch_size"])
  restored, params, step = sample.restore_ema_generator(config, workdir, info)
  latent = int(config.model.latent_dim)
  z = sample.make_noise(int(s["seed"]), ref.num_samples, latent)
  rows, real_reference, backend = [], {}, None
  for sampler in samplers:
    generator = restored
    if sampler:
      cfg = config.copy_and_resolve_references()
      cfg.model.update(sampler)
      generator = models.build_generator(cfg.model, info)
    prepared = quantize.prepare_for_sampling(generator, params, "fp32", info=info,
                                             batch_size=bs, latent_dim=latent)
    images, latency = sample.generate(prepared, z, ref.requested, batch_size=bs)
    metrics = scoring.evaluate_images(images, ref.requested, real_train=ref.train,
                                      real_test=ref.test, info=info, model=ref.model,
                                      params=ref.params, settings=s)
    ms = float(latency["ms_per_image"])
    rows.append(dict(**sampler, network_evals_per_image=network_evals_per_image(sampler),
                     images_per_s=1e3 / ms if ms > 0 else None, ms_per_image=ms,
                     compile_s=float(latency["compile_s"]),
                     **{k: metrics[k] for k in METRICS if k in metrics}))
    # The real side is the same for every row: keep the first row's.
    real_reference = real_reference or {k: metrics[f"{k}_real_reference"]
                                        for k in _REFERENCE_METRICS
                                        if f"{k}_real_reference" in metrics}
    backend = latency["backend"]
  result = dict(checkpoint_step=int(step), generator=str(config.model.generator),
                num_samples=int(ref.num_samples), seed=int(s["seed"]), backend=backend,
                extractor_path=ref.extractor_meta["path"], rows=rows,
                real_reference=real_reference)
  output.write_json(os.path.join(workdir, "eval", out_name), result)
  return output.to_json(result)


def table(result: Mapping[str, Any]) -> str:
  """`sweep`'s rows as a Markdown table, the real reference as its last line."""
  cols = [c for c in SAMPLER_KEYS if any(c in r for r in result["rows"])]
  cols += ["network_evals_per_image", "images_per_s", "ms_per_image", "compile_s",
           "fd_domain", "kid_domain", "precision", "recall", "lesion_accuracy"]
  cols = [c for c in cols if any(c in r for r in result["rows"])]
  fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in result["rows"]]
  real = result["real_reference"]
  lines.append("| " + " | ".join("real test" if i == 0 else fmt(real.get(c))
                                 for i, c in enumerate(cols)) + " |")
  return "\n".join(lines) + "\n"
