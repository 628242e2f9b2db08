"""The evaluation run: a trained checkpoint in, metrics.json and figures out.

  evaluate      `evaluate(config, workdir)`: the end-to-end run, task dispatch
  settings      `config.eval` keys, defaults and checks
  reference     the real splits and the conditions drawn from them
  scoring       `evaluate_images`: every metric of one set and its real reference
  output        metrics.json
  baseline      a baseline run's generator config, rebuilt from its config.json
  report        figures
  translation   paired translation metrics in physical units

The formulas are `medgen_jax.metrics`; experiments built on trained
generators (downstream, cross-site, sampler sweep, precision table, probe,
diagnostics) are `medgen_jax.studies`. The domain feature extractor is a
`medgen_jax.classifier` network from the `config.eval.extractor_*` recipe
(`settings`); the condition judge is `classifier.judge`.
"""
