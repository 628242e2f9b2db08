"""The inference precision table: fp32, bf16 and int8 generators side by side.

Each precision (`medgen_jax.inference.quantize`) generates the same noise and
conditions; the table gives stored bytes, latency, PSNR against fp32 and the
evaluation's domain FD and lesion accuracy.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from medgen_jax import classifier
from medgen_jax import data as data_lib
from medgen_jax.data.info import uniform_conditions
from medgen_jax.eval import reference
from medgen_jax.metrics import distances, fidelity
from medgen_jax.eval import settings as settings_lib
from medgen_jax.inference import quantize
from medgen_jax.inference import sample as sample_lib


def _markdown(rows: list[dict]) -> str:
  cols = ["precision", "param_bytes", "ms_per_image", "psnr_vs_fp32", "fd_domain",
          "lesion_accuracy"]
  fmt = lambda v: ("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def compare_precisions(config: Any, workdir: str, out_dir: str, *, num_samples: int = 64,
                       seed: int = 0, batch_size: int = 16,
                       precisions: tuple[str, ...] = quantize.PRECISIONS,
                       extractor_settings: Mapping[str, Any] | None = None) -> list[dict]:
  """Writes `precision_table.json` and `precision_table.md` under `out_dir`.

  Every precision generates the same noise and conditions (uniform over each
  field's support); PSNR is against the fp32 output, domain FD and lesion
  accuracy use the evaluation suite's domain extractor (restored from its
  cache or trained once on the real train split, see
  `medgen_jax.classifier.get_classifier`), FD against the real test
  split.

  Args:
    extractor_settings: overrides of the `config.eval` settings
      (`medgen_jax.eval.settings`); tests use a tiny extractor.

  Returns:
    the rows (precision, param_bytes, quantized_bytes, quantized_fp32_bytes,
    ms_per_image, compile_s, psnr_vs_fp32, fd_domain, lesion_accuracy).
  """
  for p in precisions:
    if p not in quantize.PRECISIONS + ("int4", "int2"):
      raise ValueError(f"unknown precision {p!r}; expected one of {quantize.PRECISIONS}")
  # fp32 runs first: it is the reference of every PSNR.
  precisions = ("fp32",) + tuple(p for p in precisions if p != "fp32")
  info = data_lib.load_info(config.data)
  generator, params, step = sample_lib.restore_ema_generator(config, workdir, info)
  settings = settings_lib.eval_settings(config)
  settings.update(extractor_settings or {})
  train, test = reference.load_real(config.data, settings)
  ext_model, ext_params, _ = classifier.get_classifier(
      settings_lib.extractor_recipe(settings), config.data, info, train=train,
      path=settings["extractor_path"])
  real_feats = classifier.extract_features(ext_model, ext_params, test["image"])

  conditions = uniform_conditions(info, np.random.default_rng(seed), num_samples)
  z = sample_lib.make_noise(seed, num_samples, int(config.model.latent_dim))
  rows, fp32_images = [], None
  for precision in precisions:
    prepared = quantize.prepare_for_sampling(generator, params, precision, info=info,
                                             batch_size=batch_size, latent_dim=z.shape[1])
    images, latency = sample_lib.generate(prepared, z, conditions, batch_size=batch_size)
    if precision == "fp32":
      fp32_images = images
    feats = classifier.extract_features(ext_model, ext_params, images)
    predicted = classifier.predict_conditions(ext_model, ext_params, images)
    fid = fidelity.condition_fidelity(predicted, conditions, info.conditions)
    # fp32 itself is the reference: its PSNR would be +inf (not valid JSON).
    row = dict(precision=precision, **quantize.stored_bytes(prepared),
               ms_per_image=latency["ms_per_image"], compile_s=latency["compile_s"],
               psnr_vs_fp32=None if fp32_images is None or precision == "fp32"
               else quantize.psnr(images, fp32_images),
               fd_domain=distances.frechet_distance(feats, real_feats)
               if len(feats) > 1 and len(real_feats) > 1 else None,
               lesion_accuracy=fid.get("lesion_accuracy"))
    rows.append(row)
  fp32_bytes = next((r["param_bytes"] for r in rows if r["precision"] == "fp32"), None)
  for r in rows:
    r["bytes_vs_fp32"] = None if fp32_bytes is None else r["param_bytes"] / fp32_bytes
    r["checkpoint_step"] = step
    r["backend"] = jax.default_backend()
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "precision_table.json"), "w") as f:
    json.dump(rows, f, indent=2)
  with open(os.path.join(out_dir, "precision_table.md"), "w") as f:
    f.write(_markdown(rows))
  return rows
