r"""The augmentation experiment: a lesion classifier's learning curve, real
images alone against real + synthetic images.

  python -m experiments.downstream --config configs/downstream_lesion.py \
      --workdir runs/downstream_lesion

Task: lesion none vs large on 64x64 phantom slices (the three-class task with
small nodules stays near chance below a few thousand real slices). Curve:
100 / 300 / 1,000 real labelled slices; synthetic arms add 1x and 3x as many
generated slices (balanced classes). Test: every none/large slice of the
validation and test subjects (held out; nothing is selected on them). Five
seeds. Protocol: `medgen_jax/studies/downstream.py`.

Labels the generators see (`labels_seen`): 'per_size' trains each generator
once per real-set size n, keeping only the lesion labels of that size's n
real images (the first n of a permutation drawn with `label_seed`; the other
train images are read without their lesion label), so a synthetic arm knows
no label its real set lacks; 'all' uses one generator trained on every label
(the real sets then vary with the seed).

Generators: `generators` maps an arm name to a training workdir (with
'_n<n>' appended per size under 'per_size'); a workdir without a checkpoint
is trained first with `generator_configs[name]`. Variants: `quick` (tiny, for tests),
`flow` (adds the flow-matching generator of `configs/phantom_flow.py`,
`runs/downstream_lesion_flow`; it samples with 32 velocity evaluations per image, so its
synthetic sets take most of the run on a CPU).

The classifier's recipe (the domain extractor's CNN, one head, 400 AdamW
steps of batch 32, the last step scored) is the same for every arm and size.
"""
import ml_collections

from configs import common, data_phantom, phantom_flow, phantom_gan


def classifier_recipe() -> ml_collections.ConfigDict:
  """The downstream classifier, shared by the augmentation and cross-site configs."""
  return ml_collections.ConfigDict(dict(
      steps=400, batch_size=32, lr=1e-3, widths=(16, 32, 64), feature_dim=64,
      stem_patch=2, pooling="mean_max"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, _ = common.parse_variants(arg, config="downstream_lesion",
                                      flags=("quick", "flow"))
  quick = "quick" in variants
  config = ml_collections.ConfigDict()
  config.experiment = "augmentation"
  config.data = data_phantom.get_config("quick" if quick else None)
  config.field = "lesion"
  config.classes = ("none", "large")
  config.num_real = (100, 300, 1000)
  config.synthetic_ratios = (1.0, 3.0)
  config.seeds = (0, 1, 2, 3, 4)
  config.test_splits = ("validation", "test")
  config.classifier = classifier_recipe()
  config.labels_seen = "per_size"   # 'per_size' (leak-free) | 'all'
  config.label_seed = 0             # draws the labelled real sets under 'per_size'
  config.generators = ml_collections.ConfigDict({"gan": "runs/downstream_lesion_gan"})
  config.generator_configs = ml_collections.ConfigDict(
      {"gan": phantom_gan.get_config("quick" if quick else None)})
  if "flow" in variants:
    config.generators.flow = "runs/downstream_lesion_flow"
    config.generator_configs.flow = phantom_flow.get_config("quick" if quick else None)
  if quick:
    config.num_real = (4, 8)
    config.synthetic_ratios = (1.0, 2.0)
    config.seeds = (0, 1)
    config.classifier.update(steps=4, batch_size=8, widths=(8,), feature_dim=8)
    for name in config.generators:
      config.generators[name] = f"/tmp/medgen_quick/downstream_{name}"
  return config
