"""Flow-matching objective: path, target, loss, time distribution and condition dropout
against hand-computed values."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from scipy import special

from configs import phantom_flow
from medgen_jax.train import flow


def test_interpolation_and_target_by_hand():
  x0 = jnp.array([[1.0, -1.0], [0.5, 0.0]])
  eps = jnp.array([[0.0, 2.0], [-1.0, 4.0]])
  t = jnp.array([0.25, 1.0])
  # Row 0: 0.75 * [1, -1] + 0.25 * [0, 2] = [0.75, -0.25]; row 1 at t = 1 is eps.
  np.testing.assert_allclose(flow.interpolate(x0, eps, t), [[0.75, -0.25], [-1.0, 4.0]])
  np.testing.assert_allclose(flow.velocity_target(x0, eps), [[-1.0, 3.0], [-1.5, 4.0]])
  # The target is the path's time derivative: a finite difference agrees.
  h = 1e-3
  fd = (flow.interpolate(x0, eps, t - h) - flow.interpolate(x0, eps, t - 2 * h)) / h
  np.testing.assert_allclose(fd, flow.velocity_target(x0, eps), rtol=1e-3)


def test_loss_by_hand():
  x0 = jnp.array([[1.0, -1.0], [0.5, 0.0]])
  eps = jnp.array([[0.0, 2.0], [-1.0, 4.0]])
  v_pred = jnp.array([[0.0, 3.0], [-1.5, 2.0]])
  # Targets [[-1, 3], [-1.5, 4]]: squared errors 1, 0, 0, 4 -> mean 1.25.
  assert float(flow.flow_matching_loss(v_pred, x0, eps)) == pytest.approx(1.25)
  assert float(flow.flow_matching_loss(eps - x0, x0, eps)) == 0.0
  # Images [B, H, W, C]: the mean is over every voxel of every example.
  big = jnp.ones((2, 3, 3, 1))
  assert float(flow.flow_matching_loss(big * 2, big, big * 0.5)) == pytest.approx(6.25)


def test_logit_normal_time_distribution():
  t = np.asarray(flow.sample_time(jax.random.PRNGKey(0), 200_000, mean=0.5, std=0.8))
  assert t.min() > 0 and t.max() < 1
  logit = special.logit(t.astype(np.float64))
  assert logit.mean() == pytest.approx(0.5, abs=0.01)
  assert logit.std() == pytest.approx(0.8, abs=0.01)
  # Median of a logit-normal is sigmoid(mean).
  assert np.median(t) == pytest.approx(special.expit(0.5), abs=0.005)


def test_drop_conditions_to_unknown():
  cond = {"lesion": jnp.array([0, 2, 1, -1], jnp.int32),
          "age": jnp.array([30.0, 50.0, np.nan, 70.0], jnp.float32)}
  drop = jnp.array([True, False, True, False])
  out = flow.drop_conditions(cond, drop)
  np.testing.assert_array_equal(out["lesion"], [-1, 2, -1, -1])
  np.testing.assert_array_equal(np.isnan(out["age"]), [True, False, True, False])
  assert float(out["age"][1]) == 50.0 and out["lesion"].dtype == jnp.int32


def test_config_rejects_discriminator_settings():
  config = phantom_flow.get_config("quick")
  flow.validate_flow_config(config)
  assert sorted(config.loss) == sorted(flow.LOSS_KEYS)
  assert "teacher" not in config and "d_lr" not in config.optim
  assert not set(phantom_flow.GAN_MODEL_KEYS) & set(config.model)
  config.loss.r1_gamma = 1.0
  with pytest.raises(ValueError, match="no discriminator"):
    flow.validate_flow_config(config)
  config = phantom_flow.get_config("quick")
  del config.loss.time_std
  with pytest.raises(ValueError, match="time_std"):
    flow.validate_flow_config(config)
  config = phantom_flow.get_config("quick")
  config.loss.cfg_dropout = 1.0
  with pytest.raises(ValueError, match="cfg_dropout"):
    flow.validate_flow_config(config)


def test_latent_dim_follows_image_size():
  config = phantom_flow.get_config()
  assert config.model.latent_dim == 64 * 64
  config.data.image_size = 32
  assert config.model.latent_dim == 32 * 32
  config = phantom_flow.get_config("3d")
  assert config.model.latent_dim == config.data.depth * config.data.image_size ** 2


def test_command_line_overrides_reach_the_flow_config():
  # The locked config experiments/*.py gets: latent_dim follows the image size.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  argv = ["prog", f"--config={os.path.join(root, 'configs/phantom_flow.py')}:quick",
          "--config.data.image_size=16", "--config.model.sample_steps=8",
          "--config.model.solver=heun"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  config = values.config
  assert config.model.latent_dim == 16 * 16
  assert (config.model.sample_steps, config.model.solver) == (8, "heun")
  assert config.task == "flow" and set(config.eval) == set(phantom_flow.get_config().eval)
