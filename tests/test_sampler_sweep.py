"""sampler_sweep: the config's own sampler reproduces `evaluate`, network
evaluations counted against the solver and the guided network, bad settings
fail before anything is loaded, and the JSON has one row per setting.

The flow checkpoint holds random parameters (`conftest.write_checkpoint`):
the sweep's bookkeeping does not need a trained velocity field.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import phantom_flow, phantom_gan
from conftest import INFO, write_checkpoint
from medgen_jax import classifier, models
from medgen_jax.eval import evaluate as ev
from medgen_jax.eval import reference
from medgen_jax.studies import sampler_sweep
from medgen_jax.inference import sample
from medgen_jax.models import velocity

# A tiny extractor and scoring; 9 samples in batches of 4 (the last one padded).
EVAL = dict(extractor_steps=6, extractor_batch_size=8, extractor_widths=(8,),
            extractor_feature_dim=8, kid_subsets=3, bootstrap_resamples=3,
            num_samples=9, generate_batch_size=4, figures=False)


def _config(module, extractor_path):
  config = module.get_config("quick")
  config.eval.update({**EVAL, "extractor_path": str(extractor_path)})
  return config


@pytest.fixture(scope="module")
def extractor_path(tmp_path_factory):
  return tmp_path_factory.mktemp("extractor") / "phantom"


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, extractor_path):
  """(config, workdir) of configs/phantom_flow.py:quick with a checkpoint at step 3."""
  config = _config(phantom_flow, extractor_path)
  workdir = str(tmp_path_factory.mktemp("flow_run"))
  write_checkpoint(config, workdir)
  return config, workdir


def test_own_sampler_row_is_evaluate_and_json_has_every_row(flow_run):
  config, workdir = flow_run
  metrics = ev.evaluate(config, workdir)
  settings = [{}, {"sample_steps": 2, "solver": "heun", "guidance_scale": 2.0}]
  result = sampler_sweep.sweep(config, workdir, settings)

  own, other = result["rows"]
  assert (own["sample_steps"], own["solver"], own["guidance_scale"]) == (3, "euler", 1.0)
  assert (other["sample_steps"], other["solver"], other["guidance_scale"]) == (2, "heun", 2.0)
  assert own["network_evals_per_image"] == 3 and other["network_evals_per_image"] == 8
  # Same conditions, noise, extractor and generator: exactly evaluate's numbers.
  for key in sampler_sweep.METRICS:
    if key in metrics:
      expected = metrics[key] if np.isfinite(metrics[key]) else None
      assert own[key] == expected, key
      if "_ci_" not in key:
        ref = metrics[f"{key}_real_reference"]
        assert result["real_reference"][key] == (ref if np.isfinite(ref) else None), key
  assert {"fd_domain", "recall", "lesion_accuracy", "hu_w1"} <= set(own)
  assert own["fd_domain"] != other["fd_domain"]  # another sampler, other images
  for row in result["rows"]:
    assert row["images_per_s"] == pytest.approx(1e3 / row["ms_per_image"])
    assert row["compile_s"] > 0
  assert result["checkpoint_step"] == metrics["checkpoint_step"] == 3
  assert result["num_samples"] == 9 and result["generator"] == "flow"
  assert result["backend"] == jax.default_backend()

  with open(os.path.join(workdir, "eval", "sampler_sweep.json")) as f:
    assert json.load(f) == result
  lines = sampler_sweep.table(result).splitlines()
  assert len(lines) == 2 + len(settings) + 1 and lines[-1].startswith("| real test |")


def test_gan_has_one_one_step_row(quick_checkpoint, extractor_path):
  _, workdir, _ = quick_checkpoint
  config = _config(phantom_gan, extractor_path)
  result = sampler_sweep.sweep(config, workdir, [{}])
  (row,) = result["rows"]
  assert row["network_evals_per_image"] == 1 and "sample_steps" not in row
  assert np.isfinite(row["fd_domain"]) and result["generator"] == "transformer"


@pytest.mark.parametrize("steps,solver,guidance", [(4, "euler", 1.0), (3, "heun", 2.0)])
def test_network_evals_are_the_networks_rows_per_image(monkeypatch, steps, solver,
                                                        guidance):
  config = phantom_flow.get_config("quick")
  config.model.update(depth=1, latent_dim=64, sample_steps=steps, solver=solver,
                      guidance_scale=guidance)
  g = models.build_generator(config.model, INFO)
  z = np.zeros((2, 64), np.float32)
  cond = {"lesion": np.array([0, 2], np.int32)}
  params = {"params": {}}  # the stand-in network below has none
  rows = []
  apply = velocity.FlowGenerator.apply

  def counting(self, variables, *args, method=None, **kwargs):
    if method != "velocity":
      return apply(self, variables, *args, method=method, **kwargs)
    # A stand-in network (zero velocity): records, each time the solver runs
    # it, how many rows it was given (the callback runs on every iteration
    # of the scan).
    x = args[0]
    jax.debug.callback(lambda: rows.append(x.shape[0]))
    return jnp.zeros_like(x)

  monkeypatch.setattr(velocity.FlowGenerator, "apply", counting)
  jax.block_until_ready(g.apply(params, z, cond, train=False))
  jax.effects_barrier()
  sampler = dict(sample_steps=steps, solver=solver, guidance_scale=guidance)
  assert sum(rows) / z.shape[0] == sampler_sweep.network_evals_per_image(sampler)
  assert sampler_sweep.network_evals_per_image({}) == 1


def _refuse_loading(monkeypatch):
  def loaded(*args, **kwargs):
    raise AssertionError("loaded before the settings were checked")
  for module, name in ((reference, "load_real"), (classifier, "get_classifier"),
                       (classifier.cache, "get_classifier"),
                       (sample, "restore_ema_generator"), (models, "build_generator")):
    monkeypatch.setattr(module, name, loaded)


@pytest.mark.parametrize("settings,words", [
    ([{"steps": 8}], "unknown keys \\['steps'\\]"),
    ([{"sample_steps": 0}], "sample_steps=0"),
    ([{"sample_steps": 8.5}], "sample_steps=8.5"),
    ([{"solver": "rk4"}], "solver='rk4'"),
    ([{"guidance_scale": -1.0}], "guidance_scale=-1.0"),
    ([{"guidance_scale": float("nan")}], "guidance_scale=nan"),
    ([{}, {"sample_steps": 3}], "already in the sweep"),
    ([], "at least one setting"),
])
def test_bad_flow_setting_fails_before_loading(flow_run, monkeypatch, settings, words):
  config, workdir = flow_run
  _refuse_loading(monkeypatch)
  with pytest.raises(ValueError, match=words):
    sampler_sweep.sweep(config, workdir, settings)


def test_sampler_setting_on_a_gan_fails_before_loading(quick_checkpoint, monkeypatch,
                                                       extractor_path):
  _, workdir, _ = quick_checkpoint
  _refuse_loading(monkeypatch)
  config = _config(phantom_gan, extractor_path)
  with pytest.raises(ValueError, match="generator='transformer'.*no sampler"):
    sampler_sweep.sweep(config, workdir, [{"sample_steps": 8}])


def test_missing_checkpoint_fails_before_loading(tmp_path, monkeypatch, extractor_path):
  _refuse_loading(monkeypatch)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    sampler_sweep.sweep(_config(phantom_flow, extractor_path), str(tmp_path), [{}])
