r"""CT -> PET translation on the phantom's paired CT/PET (pix2pix-style GAN).

  python -m experiments.train --config configs/phantom_ct2pet.py --workdir runs/ct2pet

A cross-modal transformer translator (`model.generator='translator'`: CT
tokens, PET-stream tokens attending to them through CrossModalAttention,
covariate adaLN) trained with a conditional pair discriminator plus an L1
reconstruction loss (`loss.recon_weight`). Variants (comma-separated):
`quick` (16x16, tiny, CPU seconds; used by the tests), `unet` (the pix2pix U-Net
baseline on the same data and budget), `attention=NAME`.

Another paired dataset only needs a data config and the modality names, e.g.
T1 + FLAIR -> T2 on a `medical_folder` dataset:
  --config.model.source_modalities=t1,flair --config.model.target_modalities=t2
(with model.modality_dropout > 0 so a missing source works at inference).
"""
import ml_collections

from configs import common, phantom_gan


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants, values = common.parse_variants(
      arg, config="phantom_ct2pet", flags=("quick", "unet"), values=("attention",))
  base = ["pet"] + [v for v in variants if v == "quick"]
  if "attention" in values:
    base.append(f"attention={values['attention']}")
  config = phantom_gan.get_config(",".join(base))
  config.task = "translation"
  # experiments.evaluate compares against the U-Net trained here (same data
  # and budget: --config configs/phantom_ct2pet.py:unet --workdir that dir).
  config.baseline_workdir = ""
  m = config.model
  m.generator = "translator"
  m.source_modalities = ("ct",)
  m.target_modalities = ("pet",)
  # One source here, so dropping it would leave nothing: multi-source
  # configs (T1 + FLAIR -> T2) set e.g. 0.3.
  m.modality_dropout = 0.0
  # 8x8-pixel patches (an 8x8 token grid at 64x64), sized for the CPU budget.
  m.patch_size = 8
  m.encoder_depth = 1
  # Derived, not set: a reference follows --config.data.image_size and
  # --config.model.patch_size.
  m.token_grid = token_grid(config)
  m.unet_width = 32
  m.unet_levels = 4
  config.loss.recon_weight = 100.0  # pix2pix's lambda for L1 in [-1, 1]
  # The paired L1 already ties the output to its source; the generation
  # task's condition teacher does not apply to translation.
  config.loss.teacher_weight = 0.0
  config.selector.candidates = 1  # translation samples one output per input
  # Pairs move together; intensity jitter would change SUV/HU meaning.
  config.loss.augment = "translation"
  # The non-saturating loss (docs/results.md, "CT -> PET translation").
  config.loss.update(gan="nonsaturating", r1_gamma=0.2, r2_gamma=0.0)
  config.train.num_steps = 1500
  config.train.batch_size = 16
  for v in variants:
    if v == "quick":
      config.data.image_size = 16
      m.patch_size = 4
      m.unet_width = 8
      m.unet_levels = 2
      config.train.num_steps = 2
      config.train.checkpoint_every = 2
      config.train.sample_every = 2
    elif v == "unet":
      m.generator = "unet"
  return config


def token_grid(config: ml_collections.ConfigDict):
  """`data.image_size // model.patch_size` as a reference, computed when read."""
  return config.data.get_ref("image_size") // config.model.get_ref("patch_size")
