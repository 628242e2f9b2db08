"""Bad configs fail fast with one clear ValueError naming the field."""
import os
import re
import subprocess
import sys

import pytest

from configs import phantom_gan
from medgen_jax.train import parallel, validate_config


def _config(**changes):
  config = phantom_gan.get_config("quick")
  for dotted, value in changes.items():
    section, key = dotted.split("__")
    config[section][key] = value
  return config


@pytest.mark.parametrize("changes, devices, message", [
    (dict(model__attention="flash"), 1, "unknown model.attention 'flash'"),
    (dict(model__window_size=16), 1, "window_size=16 must be <= and divide the token grid (8, 8)"),
    (dict(model__token_grid=5), 1, "image_size 32 is not divisible by model.token_grid 5"),
    (dict(train__batch_size=6), 4, "batch_size 6 is not divisible by the 4 devices"),
    (dict(loss__gan="wgan"), 1, "unknown loss.gan 'wgan'"),
    (dict(loss__augment="translation,rotate"), 1, "unknown augmentation op"),
    (dict(optim__schedule="linear"), 1, "unknown optim.schedule 'linear'"),
    (dict(parallel__mode="pjit"), 1, "unknown parallel.mode 'pjit'"),
    (dict(parallel__mesh=dict(data=3, seq=1)), 4, "product of mesh axes 3 != device count 4"),
    (dict(parallel__mode="pmap", parallel__mesh=dict(data=2, seq=2)), 4, "mesh.seq must be 1"),
    (dict(train__num_steps=0), 1, "train.num_steps must be >= 1"),
    (dict(model__d_minibatch_std=3), 1,
     "model.d_minibatch_std 3 must be 0 (off) or divide the per-device batch 4"),
    (dict(model__d_minibatch_std=4), 2,
     "model.d_minibatch_std 4 must be 0 (off) or divide the per-device batch 2"),
    (dict(loss__condition_weight=1.0), 1,
     "loss.condition_weight 1.0 and model.d_condition_heads False disagree"),
    (dict(model__d_condition_heads=True), 1,
     "loss.condition_weight 0.0 and model.d_condition_heads True disagree"),
    (dict(teacher__steps=0), 1,
     "teacher: classifier steps and batch_size must be >= 1, got 0, 64"),
    (dict(teacher__pooling="attention"), 1, "teacher: classifier pooling must be one of"),
])
def test_bad_config_is_one_clear_error(changes, devices, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    validate_config(_config(**changes), devices)


def test_good_configs_pass_and_mesh_resolves():
  for arg in ("quick", "quick,cnn", "quick,attention=axial", None):
    validate_config(phantom_gan.get_config(arg), 1)
  assert parallel.mesh_shape({"data": -1, "seq": 2}, 8) == {"data": 4, "seq": 2}


def test_config_variant_parsing():
  config = phantom_gan.get_config("quick,attention=full")
  assert config.model.attention == "full" and config.train.batch_size == 4
  with pytest.raises(ValueError, match="unknown variant 'tiny'"):
    phantom_gan.get_config("tiny")


def test_cli_rejects_typo_and_bad_attention_before_compiling(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "experiments.train", "--config", "configs/phantom_gan.py:quick",
          "--workdir", str(tmp_path)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  typo = subprocess.run(base + ["--config.model.atention=axial"], cwd=root, env=env,
                        capture_output=True, text=True, timeout=120)
  assert typo.returncode != 0 and "atention" in typo.stderr
  bad = subprocess.run(base + ["--config.model.attention=flash"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "unknown model.attention 'flash'" in bad.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_sequence_parallel_model_checks_run_in_validate_config():
  # A window variant on a seq-sharded mesh is a model-level problem: it must
  # surface from validate_config (before any data work), not from build_trainer.
  from configs import phantom_3d
  config = phantom_3d.get_config("quick,seq=4")
  validate_config(config, 8)  # the shipped variant is valid
  config.model.attention = "window"
  with pytest.raises(ValueError, match="parallel.mesh.seq=4 supports model.attention"):
    validate_config(config, 8)
