"""GAN training: losses, augmentation, EMA, state, step, parallel modes, checkpoints, loop.

The frozen condition teacher is a `medgen_jax.classifier` network built from
`config.teacher` (`loop.build_teacher`).

Public entry point: `train_and_evaluate(config, workdir) -> summary dict`.
"""
from medgen_jax.train.loop import run_training, train_and_evaluate, validate_config

__all__ = ["run_training", "train_and_evaluate", "validate_config"]
