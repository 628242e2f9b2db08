"""Translation metrics in physical units (SUV, HU): body, lesions, baseline.

For each target modality, model-range images are mapped to physical units by
the dataset's `IntensityTransform` and compared with `paired.paired_metrics`
(PSNR/SSIM on the modality's full physical range, three-plane for 3D), plus:

- `psnr_body`: PSNR over voxels inside the body mask only (background air
  is trivially right and would inflate the image PSNR);
- `mae_body`, `mae_lesion`: MAE in physical units in the body / lesion mask;
- `psnr_lesion`: PSNR inside the lesion mask;
- `lesion_mean_real` / `lesion_mean_generated`: mean value inside the
  lesion mask (is the hot lesion synthesised where it should be, as hot?).

`compare_to_baseline` puts a model's numbers beside the U-Net baseline's
trained on the same data and budget.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from medgen_jax import data as data_lib
from medgen_jax import models as models_lib
from medgen_jax.data.info import DatasetInfo
from medgen_jax.metrics import paired, physical
from medgen_jax.models.translator import source_target_names
from medgen_jax.train import checkpoint as ckpt_lib
from medgen_jax.train import state as state_lib
from medgen_jax.train import translation as train_tr


def masked_psnr(real, generated, mask, *, data_range: tuple[float, float]) -> float:
  """PSNR in dB over the voxels of `mask`, physical values scaled by data_range.

  Args:
    real, generated: `[N, *spatial, C]` physical units.
    mask: `[N, *spatial]` bool.
    data_range: (lo, hi) mapped onto [0, 1] (values clipped), as in
      `paired`.

  Returns:
    10 log10(1 / MSE) over masked voxels and channels; inf when identical,
    NaN when the mask is empty.
  """
  lo, hi = data_range
  if not hi > lo:
    raise ValueError(f"data_range must be (lo, hi) with hi > lo, got {data_range}")
  r = np.clip((np.asarray(real, np.float64) - lo) / (hi - lo), 0, 1)
  g = np.clip((np.asarray(generated, np.float64) - lo) / (hi - lo), 0, 1)
  mask = np.asarray(mask, bool)
  if mask.shape != r.shape[:-1]:
    raise ValueError(f"mask must be [N, *spatial] = {r.shape[:-1]}, got {mask.shape}")
  if not mask.any():
    return float("nan")
  mse = float(np.mean(np.square(r - g)[mask]))
  return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def body_masks_from(images_physical: np.ndarray, info: DatasetInfo) -> np.ndarray | None:
  """Body masks `[N, *spatial]` from the CT channel of real images, or None."""
  if "ct" not in info.modalities:
    return None
  ct = images_physical[..., info.modalities.index("ct")]
  return np.stack([physical.body_mask(x) for x in ct])


def translation_metrics(real, generated, info: DatasetInfo,
                        target_modalities: Sequence[str], *,
                        body_mask=None, lesion_mask=None,
                        filter_size: int = 11) -> dict[str, float]:
  """Metrics per target modality, keys '<modality>/<metric>'.

  Args:
    real, generated: `[N, *spatial, T]` model range [-1, 1], channels in
      `target_modalities` order.
    info: gives each modality's IntensityTransform (units and range).
    target_modalities: names of the T channels.
    body_mask: `[N, *spatial]` bool or None (all voxels).
    lesion_mask: `[N, *spatial]` bool/uint8 or None.
    filter_size: SSIM window.

  Returns:
    '<mod>/psnr', '/ssim' (and per plane for 3D), '/psnr_body',
    '/mae_body', and with a lesion mask '/mae_lesion', '/psnr_lesion',
    '/lesion_mean_real', '/lesion_mean_generated'. MAE and means are in the
    modality's `IntensityTransform.unit` (HU, SUV).
  """
  real = np.asarray(real, np.float32)
  generated = np.asarray(generated, np.float32)
  if real.shape != generated.shape:
    raise ValueError(f"real {real.shape} and generated {generated.shape} differ")
  if real.shape[-1] != len(target_modalities):
    raise ValueError(f"{real.shape[-1]} channels but target modalities "
                     f"{tuple(target_modalities)}")
  spatial = real.shape[:-1]
  if body_mask is None:
    body_mask = np.ones(spatial, bool)
  body_mask = np.asarray(body_mask, bool)
  if body_mask.shape != spatial:
    raise ValueError(f"body_mask must be {spatial}, got {body_mask.shape}")
  lesion = None if lesion_mask is None else np.asarray(lesion_mask) > 0
  if lesion is not None and lesion.shape != spatial:
    raise ValueError(f"lesion_mask must be {spatial}, got {lesion.shape}")
  out = {}
  for c, name in enumerate(target_modalities):
    t = info.intensity[info.modalities.index(name)]
    r = t.to_physical(real[..., c])[..., None]
    g = t.to_physical(generated[..., c])[..., None]
    rng = (t.lo, t.hi)
    m = paired.paired_metrics(r, g, data_range=rng, body_mask=body_mask,
                              lesion_mask=lesion, filter_size=filter_size)
    m["psnr_body"] = masked_psnr(r, g, body_mask, data_range=rng)
    if lesion is not None:
      m["psnr_lesion"] = masked_psnr(r, g, lesion, data_range=rng)
      has = lesion.any()
      m["lesion_mean_real"] = float(r[..., 0][lesion].mean()) if has else float("nan")
      m["lesion_mean_generated"] = float(g[..., 0][lesion].mean()) if has else float("nan")
    out.update({f"{name}/{k}": v for k, v in m.items()})
  return out


def translate_arrays(translate_fn: Callable[[np.ndarray, Mapping[str, np.ndarray]], Any],
                     images: np.ndarray, conditions: Mapping[str, np.ndarray], *,
                     batch_size: int) -> np.ndarray:
  """Runs `translate_fn(images_batch, conditions_batch) -> [b, *spatial, T]`
  over `images` `[N, *spatial, C]` in batches; returns `[N, *spatial, T]`."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  outs = []
  for i in range(0, len(images), batch_size):
    cond = {k: np.asarray(v)[i:i + batch_size] for k, v in conditions.items()}
    outs.append(np.asarray(translate_fn(images[i:i + batch_size], cond)))
  return np.concatenate(outs, 0)


def compare_to_baseline(model: Mapping[str, float], baseline: Mapping[str, float]
                        ) -> dict[str, dict[str, float]]:
  """{metric: {'model', 'baseline', 'better'}} for metrics both have.

  'better' is model - baseline for metrics where higher is better and
  baseline - model for errors, so > 0 always means the model wins.
  """
  out = {}
  for key in sorted(set(model) & set(baseline)):
    a, b = float(model[key]), float(baseline[key])
    metric = key.split("/")[-1]
    if metric.startswith("lesion_mean"):
      continue  # a value, not a score: compare each against the real one
    higher = metric.startswith(("psnr", "ssim"))  # the rest are errors
    diff = (a - b) if higher else (b - a)
    out[key] = {"model": a, "baseline": b,
                "better": float(diff) if np.isfinite(diff) else float("nan")}
  return out


def restore_translator(config: Any, workdir: str, info: DatasetInfo
                       ) -> tuple[Callable[[np.ndarray, Mapping[str, np.ndarray]], np.ndarray], int]:
  """(translate(images, conditions) -> [b, *spatial, T], step) of the EMA
  translator in the newest checkpoint of `workdir` (config.task translation).

  Raises:
    FileNotFoundError: no checkpoint in `workdir/checkpoints`.
  """
  generator = models_lib.build_generator(config.model, info)
  models = state_lib.make_models(
      generator, models_lib.build_discriminator(config.model, info), config)
  abstract = jax.eval_shape(train_tr.make_init_fn(models, info, config))
  # Only the EMA translator (and its non-param collections) is read.
  fields, step = ckpt_lib.restore_fields(
      workdir, {"ema_params": abstract.ema_params, "g_state": abstract.g_state},
      keep=int(config.train.keep_checkpoints))
  variables = {"params": fields["ema_params"], **fields["g_state"]}

  @jax.jit
  def run(images, cond):
    sources, _, _ = train_tr.split_pair(images, config.model, info)
    return generator.apply(variables, sources, cond, train=False)

  def translate(images, cond):
    return np.asarray(run(np.asarray(images, np.float32),
                          {f.name: np.asarray(cond[f.name]) for f in info.conditions}))
  return translate, int(step)


def evaluate_translation(config: Any, workdir: str, *, baseline_workdir: str | None = None,
                         split: str = "test", max_examples: int | None = None,
                         batch_size: int = 16, filter_size: int = 11) -> dict[str, Any]:
  """Metrics of the translator in `workdir` (and of a baseline) on a split.

  The baseline is the same config with `model.generator='unet'` trained in
  `baseline_workdir` (e.g. `configs/phantom_ct2pet.py:unet`). Body masks
  come from the real CT channel when there is one, lesion masks from the
  dataset's 'lesion_mask'.

  Returns:
    {'model': metrics, 'checkpoint_step', and with a baseline 'baseline':
    metrics, 'comparison': `compare_to_baseline`}; also written to
    `workdir/eval/translation_metrics.json`.
  """
  info = data_lib.load_info(config.data)
  _, targets = source_target_names(config.model, info)
  arrays = data_lib.load_arrays(config.data, split=split, max_examples=max_examples)
  images = arrays["image"]
  cond = {f.name: arrays[f.name] for f in info.conditions}
  real = np.stack([images[..., info.modalities.index(t)] for t in targets], -1)
  body = body_masks_from(info.to_physical(images), info)
  lesion = arrays.get("lesion_mask")

  def score(cfg, run_dir):
    translate, step = restore_translator(cfg, run_dir, info)
    fake = translate_arrays(translate, images, cond, batch_size=batch_size)
    return translation_metrics(real, fake, info, targets, body_mask=body,
                               lesion_mask=lesion, filter_size=filter_size), step

  out: dict[str, Any] = {}
  out["model"], out["checkpoint_step"] = score(config, workdir)
  if baseline_workdir:
    base = copy.deepcopy(config)
    with base.unlocked():
      base.model.generator = "unet"
    out["baseline"], out["baseline_step"] = score(base, baseline_workdir)
    out["comparison"] = compare_to_baseline(out["model"], out["baseline"])
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "translation_metrics.json"), "w") as f:
    json.dump(out, f, indent=2, default=float)
  return out
