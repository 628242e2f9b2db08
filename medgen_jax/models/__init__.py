"""Generators and discriminators built from `(config.model, DatasetInfo)`.

    G = build_generator(config.model, info)
    image = G.apply(g_vars, z, conditions, train=..., rngs={'dropout': r})
    # z [B, latent_dim] -> [B, *info.spatial_shape, info.num_channels] in [-1, 1]
    D = build_discriminator(config.model, info)
    logits, upd = D.apply(d_vars, images, conditions, train=True,
                          mutable=['batch_stats'])          # logits [B]

RNG streams: 'params' (init) and 'dropout' (condition dropout and attention
dropout, only used with train=True). The generator has only 'params'; the
ResNet discriminator with `spectral_norm=True` also has 'batch_stats'
(spectral-norm power iteration), which the D update must pass as mutable
with train=True (the R3GAN discriminator has only 'params'). Use
train=False (nothing mutable) wherever D only scores, e.g. inside the G loss
if its power iteration should not advance twice per step.

Registries are plain dicts name -> builder(model_config, info) -> Module.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn

from medgen_jax.data.info import DatasetInfo
from medgen_jax.models.cnn import CNNGenerator, build_cnn_generator
from medgen_jax.models.discriminator import (ResNetDiscriminator,
                                             build_resnet_discriminator)
from medgen_jax.models.generator import (TransformerGenerator,
                                         build_transformer_generator)
from medgen_jax.models.r3gan_discriminator import (R3GANDiscriminator,
                                                   build_r3gan_discriminator)
from medgen_jax.models.translator import Translator, build_translator
from medgen_jax.models.unet import UNet, build_unet
from medgen_jax.models.variants import VARIANTS, Variant, decode_variant
from medgen_jax.models.velocity import FlowGenerator, build_flow_generator

Builder = Callable[..., nn.Module]

GENERATORS: dict[str, Builder] = {
    "transformer": build_transformer_generator,
    "cnn": build_cnn_generator,
    # Flow matching (config.task = 'flow'): G(z, conditions) integrates the
    # ODE; training calls G.apply(..., method='velocity').
    "flow": build_flow_generator,
    # Image-to-image (config.task = 'translation'): called as
    # G(sources, conditions, *, train, source_mask=None).
    "translator": build_translator,
    "unet": build_unet,
}

DISCRIMINATORS: dict[str, Builder] = {
    "resnet": build_resnet_discriminator,
    # Normalisation-free (params only, no 'batch_stats'); ignores spectral_norm.
    "r3gan": build_r3gan_discriminator,
}


def build_generator(model_config, info: DatasetInfo) -> nn.Module:
  """The generator named by `model_config.generator`, validated against info.

  Raises:
    ValueError: unknown name, variant or dtype, or sizes that do not fit
      (image size vs token grid, window vs grid, heads vs width).
  """
  name = model_config.generator
  if name not in GENERATORS:
    raise ValueError(f"unknown generator {name!r}; valid: {sorted(GENERATORS)}")
  return GENERATORS[name](model_config, info)


def build_discriminator(model_config, info: DatasetInfo) -> nn.Module:
  """The discriminator named by `model_config.discriminator`.

  Raises:
    ValueError: unknown name or dtype, or sizes that do not fit (the r3gan
      group size vs its branch width).
  """
  name = model_config.discriminator
  if name not in DISCRIMINATORS:
    raise ValueError(f"unknown discriminator {name!r}; valid: "
                     f"{sorted(DISCRIMINATORS)}")
  return DISCRIMINATORS[name](model_config, info)


__all__ = [
    "GENERATORS", "DISCRIMINATORS", "build_generator", "build_discriminator",
    "TransformerGenerator", "CNNGenerator", "ResNetDiscriminator",
    "R3GANDiscriminator",
    "Translator", "UNet", "FlowGenerator",
    "VARIANTS", "Variant", "decode_variant",
]
