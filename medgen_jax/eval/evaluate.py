"""`evaluate(config, workdir)`: every generation metric with its real reference.

One evaluation run:

1. checks that `workdir` holds a checkpoint (before anything expensive);
2. loads the real train and test splits (`reference.load_real`; this step,
   the next and the condition draw of step 4 are `reference.load_reference`,
   which the sampler sweep shares);
3. gets the domain feature extractor: restored from its orbax cache, or
   trained once on the real train split and cached
   (`medgen_jax.classifier.get_classifier`; without conditions it
   learns the label-free rotation pretext, and its rotation accuracy on the
   real test and train splits is reported as `extractor_pretext_accuracy_*`);
   The condition judge (`config.judge`, `medgen_jax.classifier.judge`) is
   restored or trained the same way, on fresh phantom renders where it can;
4. draws `num_samples` condition tuples from the real test split's rows (so
   class balance and covariate mix match the reference; none for an
   unconditional model) and generates images for them with the latest EMA
   generator (`medgen_jax.inference.sample`);
5. scores the generated set against the real TRAIN split, and scores the real
   TEST split against the real train split in exactly the same way
   (`scoring.evaluate_images`); redraws some requests with one condition
   switched to see whether the images follow it at all
   (`condition_effect`, `eval.condition_effect_samples`);
6. writes `workdir/eval/metrics.json` (`output.write_metrics`) and the
   figures (`medgen_jax.eval.report`).

A translation config (`config.task == 'translation'`) is dispatched to
`medgen_jax.eval.translation.evaluate_translation`. Settings come from
`config.eval` (`medgen_jax.eval.settings`).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from medgen_jax import classifier
from medgen_jax.classifier import judge as judge_lib
from medgen_jax.data.info import DatasetInfo
from medgen_jax.eval import baseline as baseline_lib
from medgen_jax.eval import condition_effect, output, reference, scoring, translation
from medgen_jax.eval import settings as settings_lib
from medgen_jax.inference import sample, selection
from medgen_jax.train import checkpoint as ckpt_lib

GenerateFn = Callable[..., np.ndarray]  # (conditions, seed, num=None) -> images


def checkpoint_generator(config: Any, workdir: str, info: DatasetInfo, *,
                         batch_size: int = 64) -> tuple[GenerateFn, int]:
  """(generate(conditions, seed, num=None) -> `[n, *spatial, C]` images in
  [-1, 1], checkpoint step) for the latest fp32 EMA generator in `workdir`;
  n is the conditions' length, or `num` when there are none."""
  return sample.generator_fn(config, workdir, info, precision="fp32",
                             batch_size=batch_size)


def evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Evaluates the latest checkpoint in `workdir`; writes `workdir/eval/`.

  Returns:
    the flat metrics dict also written to `workdir/eval/metrics.json`, with
    `checkpoint_step`, the extractor's path and whether it was reused.
    A translation config (`config.task == 'translation'`) returns
    `eval.translation.evaluate_translation`'s paired metrics instead.
    With `config.baseline_workdir` (e.g. a `:cnn` run on the same data and
    budget) its generator, rebuilt from its own `config.json`, is scored on
    the same requested conditions, noise seed and extractor: `baseline_<key>`
    for every metric, `baseline_checkpoint_step`, and figures under
    `eval/figures/baseline/`.
  """
  if config.task == "translation":
    return translation.evaluate_translation(
        config, workdir, baseline_workdir=config.baseline_workdir or None)
  s = settings_lib.eval_settings(config)
  candidates = selection.num_candidates(config)  # a bad value fails before any build
  judge_section = config.get("judge")
  if judge_section is not None:
    settings_lib.check_independent(config, judge_lib.judge_recipe(judge_section)[0], "judge.seed")
  step = ckpt_lib.require_checkpoint(workdir)
  baseline_dir = config.baseline_workdir or None
  baseline_config = (baseline_lib.baseline_generator_config(config, baseline_dir)
                     if baseline_dir else None)
  ref = reference.load_reference(config, s)
  info, train, test, model, params = ref.info, ref.train, ref.test, ref.model, ref.params
  meta, num, requested = ref.extractor_meta, ref.num_samples, ref.requested
  judge = (judge_lib.get_judge(judge_section, config.data, info)
           if judge_section is not None and info.conditions else None)
  generate, gen_step = checkpoint_generator(
      config, workdir, info, batch_size=int(s["generate_batch_size"]))
  generated = generate(requested, int(s["seed"]), num)
  baseline = None
  if baseline_config is not None:
    generate_baseline, base_step = checkpoint_generator(
        baseline_config, baseline_dir, info, batch_size=int(s["generate_batch_size"]))
    baseline = generate_baseline(requested, int(s["seed"]), num)
  out_dir = os.path.join(workdir, "eval")
  metrics = scoring.evaluate_images(generated, requested, real_train=train,
                                    real_test=test, info=info, model=model,
                                    params=params, settings=s,
                                    figures_dir=os.path.join(out_dir, "figures"),
                                    baseline=baseline, judge=judge)
  if requested and int(s["condition_effect_samples"]):
    metrics.update(condition_effect.condition_effect(
        generate, requested, info, seed=int(s["seed"]),
        num=min(int(s["condition_effect_samples"]), len(next(iter(requested.values()))))))
  metrics.update(checkpoint_step=int(gen_step if gen_step is not None else step),
                 extractor_path=meta["path"], extractor_reused=meta["reused"],
                 selector_candidates=candidates)
  if judge is not None:
    metrics.update(judge_kind=judge.kind, judge_path=judge.meta["path"],
                   judge_reused=judge.meta["reused"])
  if classifier.is_pretext(model):
    # Does the label-free extractor know anatomy beyond its train subjects?
    metrics.update(
        extractor_pretext_accuracy_test=classifier.pretext_accuracy(
            model, params, test["image"], seed=int(s["seed"])),
        extractor_pretext_accuracy_train=classifier.pretext_accuracy(
            model, params, train["image"][:len(test["image"])], seed=int(s["seed"])))
  if baseline_config is not None:
    metrics.update(baseline_checkpoint_step=int(
        base_step if base_step is not None else ckpt_lib.require_checkpoint(baseline_dir)),
                   baseline_workdir=os.path.abspath(baseline_dir))
  metrics.update({f"figure_{k}": os.path.relpath(v, out_dir)
                  for k, v in metrics.pop("figures", {}).items()})
  output.write_metrics(os.path.join(out_dir, "metrics.json"), metrics)
  return metrics
