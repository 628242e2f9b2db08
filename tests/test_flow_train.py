"""The velocity network's shapes (2D / 3D, every attention variant), the flow
step in the training loop, and resume after a crash ending equal to an
uninterrupted run; the parallel modes (slow) agree with one device."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import phantom_flow
from conftest import INFO, flow_shapes, tiny_iterator
from medgen_jax import models
from medgen_jax.data.info import ConditionField, DatasetInfo, IntensityTransform
from medgen_jax.models.layers import pixel_shuffle, space_to_depth
from medgen_jax.train import checkpoint as ckpt_lib
from medgen_jax.train import flow, loop, state as state_lib
from medgen_jax.train.loop import run_training

INFO_3D = DatasetInfo(
    name="synthetic3d", image_shape=(4, 8, 8, 1), modalities=("ct",),
    intensity=(IntensityTransform("ct", "HU", -1000.0, 1000.0),),
    conditions=(ConditionField("lesion", "categorical", 3, ("none", "small", "large")),
                ConditionField("age", "continuous", value_range=(20.0, 90.0))))


def tiny_flow_config(**train):
  """configs/phantom_flow.py:quick, its model sized for conftest's 8x8 INFO."""
  config = phantom_flow.get_config("quick")
  config.model.update(depth=1, latent_dim=64)
  config.train.update(dict(num_steps=4, batch_size=8, log_every=1, sample_every=100,
                           checkpoint_every=2, keep_checkpoints=10))
  config.train.update(train)
  return config


@pytest.mark.parametrize("info,attention,token_grid", [
    (INFO, "full", 4), (INFO, "axial", 4), (INFO, "window_shifted", 4),
    (INFO_3D, "axial", 2), (INFO_3D, "window_shifted", 4), (INFO_3D, "full", 2)])
def test_velocity_and_sampler_shapes(info, attention, token_grid):
  config = phantom_flow.get_config("quick")
  config.model.update(attention=attention, token_grid=token_grid, window_size=2,
                      latent_dim=int(np.prod(info.image_shape)))
  g = models.build_generator(config.model, info)
  n = 3
  cond = state_lib.dummy_conditions(info, n)
  variables, v, images = flow_shapes(g, info, n)
  assert v.shape == images.shape == (n,) + info.image_shape
  # The sampler's init creates exactly the velocity network's parameters.
  by_call = jax.eval_shape(lambda: g.init(jax.random.PRNGKey(0), jnp.zeros((n, g.latent_dim)),
                                          cond, train=False))
  assert jax.tree.structure(by_call) == jax.tree.structure(variables)
  names = set(variables["params"])
  assert {"condition_embedding", "mapping", "patch_embed", "head"} <= names
  assert any(k.startswith("block_0_") for k in names)


def test_patchify_roundtrip_2d_and_3d():
  for shape in [(2, 8, 8, 3), (2, 4, 8, 8, 1)]:
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    np.testing.assert_array_equal(pixel_shuffle(space_to_depth(x, 4 if len(shape) == 4 else 2),
                                                4 if len(shape) == 4 else 2), x)


def test_bad_flow_configs_fail_before_tracing():
  config = phantom_flow.get_config("quick")
  config.model.latent_dim = 10
  with pytest.raises(ValueError, match="latent_dim"):
    models.build_generator(config.model, INFO)
  config = tiny_flow_config()
  config.model.token_grid = 3
  with pytest.raises(ValueError, match="token_grid"):
    models.build_generator(config.model, INFO)
  config = tiny_flow_config()
  config.model.solver = "rk4"
  with pytest.raises(ValueError, match="solver"):
    models.build_generator(config.model, INFO)


class CrashingIterator:
  """Delegates to a grain iterator and raises on batch `crash_at` (1-based):
  the run dies mid-way like a killed process, after its last checkpoint."""

  def __init__(self, it, crash_at):
    self.it, self.n, self.crash_at = it, 0, crash_at

  def __iter__(self):
    return self

  def __next__(self):
    self.n += 1
    if self.n == self.crash_at:
      raise RuntimeError("simulated crash")
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


def _final_state(config, workdir):
  g = models.build_generator(config.model, INFO)
  m = state_lib.make_models(g, None, config)
  trainer = loop.make_trainer(config, m, INFO, devices=jax.devices()[:1])
  manager = ckpt_lib.make_manager(os.path.join(workdir, "checkpoints"), keep=10)
  state, data_state, step = ckpt_lib.restore_latest(
      manager, ckpt_lib.abstract_with_sharding(trainer.abstract_state, trainer.state_sharding))
  manager.close()
  return jax.device_get(state), data_state, step, jax.device_get(trainer.init_state())


def test_flow_run_writes_losses_samples_and_checkpoints(tmp_path):
  config = tiny_flow_config(num_steps=2)
  g = models.build_generator(config.model, INFO)
  summary = run_training(config, str(tmp_path), info=INFO, generator=g, discriminator=None,
                         iterator=tiny_iterator())
  assert summary["steps"] == 2 and np.isfinite(summary["last_losses"]["flow_loss"])
  assert ckpt_lib.latest_step(str(tmp_path)) == 2
  # The loop's grid comes from the generator's call, i.e. the ODE sampler.
  assert os.path.exists(tmp_path / "samples" / "step_000002.png")
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2] and "variety_ema" in rows[-1]
  assert rows[0]["flow_loss"] > 0 and "d_loss" not in rows[0]


@pytest.mark.slow  # five compilations (three runs, two restores): ~40 CPU-seconds
def test_flow_training_resumes_after_a_crash_to_the_same_parameters(tmp_path):
  config = tiny_flow_config()
  g = models.build_generator(config.model, INFO)
  kw = dict(info=INFO, generator=g, discriminator=None)
  crashed = str(tmp_path / "crashed")
  with pytest.raises(RuntimeError, match="simulated crash"):
    run_training(config, crashed, iterator=CrashingIterator(tiny_iterator(), 4), **kw)
  assert ckpt_lib.latest_step(crashed) == 2  # step 3 ran but was never saved
  resumed = run_training(config, crashed, iterator=tiny_iterator(), **kw)
  assert resumed["start_step"] == 2 and resumed["steps"] == 4
  ref = str(tmp_path / "ref")
  run_training(config, ref, iterator=tiny_iterator(), **kw)
  got, got_data, got_step, initial = _final_state(config, crashed)
  want, want_data, want_step, _ = _final_state(config, ref)
  assert got_step == want_step == 4 and got_data == want_data
  assert isinstance(got, flow.FlowState) and not hasattr(got, "d_params")
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got.g_params,
                       initial.g_params)
  assert max(jax.tree.leaves(moved)) > 0  # training changed the parameters
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


PARALLEL_SCRIPT = textwrap.dedent("""
  import os, sys
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  sys.path.insert(0, os.environ["TESTS_DIR"])
  import jax, numpy as np
  from conftest import INFO, tiny_batch
  from test_flow_train import tiny_flow_config
  from medgen_jax import models
  from medgen_jax.train import flow, loop, parallel, state as state_lib

  assert jax.device_count() == 8
  out = {}
  for name, mode, devices in [("single", "jit", jax.devices()[:1]), ("jit", "jit", None),
                              ("pmap", "pmap", None), ("shard_map", "shard_map", None)]:
    config = tiny_flow_config()
    config.parallel.mode = mode
    g = models.build_generator(config.model, INFO)
    m = state_lib.make_models(g, None, config)
    trainer = loop.make_trainer(config, m, INFO, devices=devices)
    state = trainer.init_state()
    for i in range(3):
      state, metrics = trainer.step(state, trainer.put_batch(tiny_batch(i)), with_r1=False)
      out[f"{name}/flow_loss/{i}"] = np.asarray(metrics["flow_loss"])
    host = jax.device_get(trainer.get_state(state))
    for path, leaf in jax.tree_util.tree_leaves_with_path((host.g_params, host.ema_params)):
      out[f"{name}/param{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  np.savez(os.environ["OUT"], **out)
""")


@pytest.mark.slow  # four compilations of the step on 8 simulated devices
def test_parallel_modes_match_single_device(tmp_path):
  out = tmp_path / "out.npz"
  env = dict(os.environ, TESTS_DIR=os.path.dirname(__file__), OUT=str(out),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", PARALLEL_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = np.load(out)
  ref = {k.split("/", 1)[1]: res[k] for k in res.files if k.startswith("single/")}
  assert len([k for k in ref if k.startswith("param")]) >= 10
  assert float(ref["flow_loss/0"]) > 0
  for mode in ("jit", "pmap", "shard_map"):
    for key, want in ref.items():
      np.testing.assert_allclose(res[f"{mode}/{key}"], want, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{mode}: {key}")
