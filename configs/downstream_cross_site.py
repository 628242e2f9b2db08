r"""The cross-site experiment: a lesion classifier trained at three sites and
tested at a fourth, whose scans have no labels.

  python -m experiments.downstream --config configs/downstream_cross_site.py \
      --workdir runs/downstream_cross_site

Sites 0-2 give 1,000 labelled none/large slices; site 3 (the noisiest,
blurriest scanner, with the largest HU offset) is the target. Arms: source
slices alone; + 500 synthetic slices requested for site 3; + 500 synthetic
slices for the source sites (the "more images" control); and, as the
reference that uses target labels, + 500 real labelled site-3 slices (site 3
has 521 none/large train slices).
Tests: held-out subjects of site 3 and of sites 0-2. Five seeds. Protocol:
`medgen_jax/studies/cross_site.py`.

The generator is the GAN default trained with site 3's lesion labels hidden
(`data.hide_labels='lesion:site=3'`; its images are still used), in
`runs/phantom_unlabelled_site3`, trained first when that workdir has no
checkpoint. The experiment refuses a generator that saw the target's labels.

On one's own multi-site folder (a `site` column in the labels CSV):

  python -m experiments.downstream --config configs/downstream_cross_site.py:folder \
      --config.data.source_dir=/data/ct --config.data.labels_csv=/data/labels.csv \
      --config.field=lesion --config.classes=none,large --config.target_site=hospital_d \
      --config.generators.gan=runs/my_ct_unlabelled_d \
      --config.generator_configs.gan.data.hide_labels=lesion:site=hospital_d \
      --workdir runs/xsite

Variants: `quick` (tiny, for tests), `folder` (data and generator from
`configs/folder_gan.py`).
"""
import ml_collections

from configs import common, data_phantom, downstream_lesion, folder_gan, phantom_gan


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, _ = common.parse_variants(arg, config="downstream_cross_site",
                                      flags=("quick", "folder"))
  quick = "quick" in variants
  base = "quick" if quick else None
  config = ml_collections.ConfigDict()
  config.experiment = "cross_site"
  config.field = "lesion"
  config.classes = ("none", "large")
  config.site_field = "site"
  config.target_site = "3"
  config.num_real = 1000
  config.num_synthetic = 500
  config.seeds = (0, 1, 2, 3, 4)
  config.test_splits = ("validation", "test")
  config.classifier = downstream_lesion.classifier_recipe()
  generator = (folder_gan.get_config(base) if "folder" in variants
               else phantom_gan.get_config(base))
  generator.data.hide_labels = f"{config.field}:{config.site_field}={config.target_site}"
  config.data = (folder_gan.get_config(base).data if "folder" in variants
                 else data_phantom.get_config(base))
  config.data.hide_labels = ""
  if "folder" in variants:  # one place to name the folder: the generator reads it too
    for key in ("source_dir", "labels_csv"):
      generator.data[key] = config.data.get_ref(key)
  config.generators = ml_collections.ConfigDict(
      {"gan": "runs/phantom_unlabelled_site3"})
  config.generator_configs = ml_collections.ConfigDict({"gan": generator})
  if quick:
    config.num_real = 8
    config.num_synthetic = 2
    config.seeds = (0, 1)
    config.classifier.update(steps=4, batch_size=8, widths=(8,), feature_dim=8)
    config.generators.gan = "/tmp/medgen_quick/cross_site_gan"
  return config
