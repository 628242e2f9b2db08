"""GAN training: losses, augmentation, EMA, state, step, parallel modes, checkpoints, loop,
and the condition classifier (`extractor`, cached by `extractor_cache`) that is both
the GAN's condition teacher and the evaluation's domain feature extractor.

Public entry point: `train_and_evaluate(config, workdir) -> summary dict`.
"""
from medgen_jax.train.loop import run_training, train_and_evaluate, validate_config

__all__ = ["run_training", "train_and_evaluate", "validate_config"]
