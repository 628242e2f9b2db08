r"""Downstream augmentation experiment: lesion classifier, real vs real + synthetic.

  python -m experiments.downstream --config configs/downstream_lesion.py \
      --workdir runs/downstream

Trains the lesion classifier (the domain extractor's CNN, lesion head only)
on `num_real` real train images alone, and on the same images plus
`num_synthetic` class-balanced synthetic images from each generator in
`generators` (name -> training workdir; trained first with
`generator_configs[name]` when the workdir has no checkpoint), over `seeds`,
and tests on the held-out real test subjects. See
`medgen_jax.eval.downstream` for the protocol.

Variants: `quick` (tiny, for tests: 2 seeds, few steps, quick data and
generator configs).
"""
import ml_collections

from configs import common, data_phantom, phantom_gan


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, _ = common.parse_variants(arg, config="downstream_lesion", flags=("quick",))
  quick = "quick" in variants
  config = ml_collections.ConfigDict()
  config.data = data_phantom.get_config("quick" if quick else None)
  config.field = "lesion"
  config.num_real = 200
  config.num_synthetic = 600
  config.seeds = (0, 1, 2)
  config.max_test = ml_collections.config_dict.placeholder(int)
  config.classifier = ml_collections.ConfigDict(dict(
      steps=800, batch_size=32, lr=1e-3, widths=(16, 32, 64), feature_dim=64,
      stem_patch=2, pooling="mean_max"))
  config.generators = ml_collections.ConfigDict(
      {"transformer": "runs/phantom", "cnn": "runs/phantom_cnn"})
  config.generator_configs = ml_collections.ConfigDict(
      {"transformer": phantom_gan.get_config("quick" if quick else None),
       "cnn": phantom_gan.get_config("quick,cnn" if quick else "cnn")})
  if quick:
    config.num_real = 12
    config.num_synthetic = 12
    config.seeds = (0, 1)
    config.classifier.update(steps=4, batch_size=8, widths=(8,), feature_dim=8)
    config.generators = ml_collections.ConfigDict(
        {"transformer": "/tmp/medgen_quick/phantom",
         "cnn": "/tmp/medgen_quick/phantom_cnn"})
  return config
