"""Paired translation step, translation metrics (known answers), quick runs."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import phantom_ct2pet
from medgen_jax.data.info import ConditionField, DatasetInfo, IntensityTransform
from medgen_jax.eval import translation as tmetrics
from medgen_jax.models.discriminator import ResNetDiscriminator
from medgen_jax.models.translator import Translator
from medgen_jax.train import state as state_lib
from medgen_jax.train import translation

SHAPE = (16, 16)
INFO = DatasetInfo(
    name="toy", image_shape=(*SHAPE, 2), modalities=("ct", "pet"),
    intensity=(IntensityTransform("ct", "HU", -1000.0, 1000.0),
               IntensityTransform("pet", "SUV", 0.0, 10.0)),
    conditions=(ConditionField("lesion", "categorical", num_classes=3),))


def _config(recon_weight=100.0):
  config = phantom_ct2pet.get_config("quick")
  config.loss.recon_weight = recon_weight
  config.loss.r1_gamma = 0.0
  config.loss.augment = ""
  config.optim.g_lr = 3e-3
  config.optim.d_lr = 1e-4
  return config


@pytest.fixture(scope="module")
def setup():
  config = _config()
  g = Translator(spatial_shape=SHAPE, source_modalities=("ct",),
                 num_target_channels=1, conditions=INFO.conditions, width=8,
                 depth=1, num_heads=2, encoder_depth=0, patch_size=4,
                 attention="window", window_size=2, cond_dim=8, refine_width=4)
  d = ResNetDiscriminator(conditions=INFO.conditions, width=4, spectral_norm=False)
  models = state_lib.make_models(g, d, config)
  hooks = translation.trainer_hooks(config, models, INFO)
  state = jax.jit(hooks["init_fn"])()
  step = jax.jit(functools.partial(hooks["step_fn"], models=models))
  rng = np.random.default_rng(0)
  ct = rng.uniform(-1, 1, (2, *SHAPE, 1)).astype(np.float32)
  pet = np.tanh(2 * ct + 0.3).astype(np.float32)   # a learnable CT -> PET map
  batch = {"image": jnp.asarray(np.concatenate([ct, pet], -1)),
           "lesion": jnp.array([0, 2], jnp.int32)}
  return config, models, state, step, batch


@pytest.mark.slow  # compiling init + step takes minutes on the loaded 2-core box
def test_step_reports_the_l1_of_the_current_generator_and_reduces_it(setup):
  _, models, state, step, batch = setup
  g = models.generator
  ct, pet = batch["image"][..., :1], batch["image"][..., 1:]
  fake = g.apply({"params": state.g_params}, {"ct": ct}, {"lesion": batch["lesion"]},
                 train=False)
  expected = float(jnp.mean(jnp.abs(fake - pet)))
  recon = []
  for _ in range(6):
    state, metrics = step(state, batch)
    recon.append(float(metrics["recon_l1"]))
    assert bool(metrics["is_finite"])
  assert recon[0] == pytest.approx(expected, rel=1e-4)
  # Measured: 0.77 -> 0.59 after 6 steps (the L1 term dominates at weight 100).
  assert recon[-1] < 0.85 * recon[0]
  assert int(state.step) == 6
  # The EMA moved towards the new params but is not them.
  leaf = lambda t: jax.tree.leaves(t)[0]
  assert not np.allclose(leaf(state.ema_params), leaf(state.g_params))


def test_translation_config_errors():
  config = _config(recon_weight=-1.0)
  with pytest.raises(ValueError, match="recon_weight"):
    translation.validate_translation_config(config, INFO)
  config = _config()
  config.model.target_modalities = ("mr",)
  with pytest.raises(ValueError, match="modalities"):
    translation.validate_translation_config(config, INFO)


def test_split_pair_orders_channels_by_config():
  images = jnp.arange(2 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 2)
  sources, src, tgt = translation.split_pair(images, _config().model, INFO)
  np.testing.assert_array_equal(src[..., 0], images[..., 0])
  np.testing.assert_array_equal(tgt[..., 0], images[..., 1])
  assert list(sources) == ["ct"]


# ---- metrics: known answers ----

def test_identical_images_give_inf_psnr_unit_ssim_zero_mae():
  rng = np.random.default_rng(0)
  real = rng.uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  lesion = np.zeros((2, 16, 16), bool)
  lesion[:, 4:8, 4:8] = True
  m = tmetrics.translation_metrics(real, real, INFO, ("pet",), lesion_mask=lesion,
                                   filter_size=7)
  assert m["pet/psnr"] == float("inf") and m["pet/psnr_body"] == float("inf")
  assert m["pet/psnr_lesion"] == float("inf")
  assert m["pet/ssim"] == pytest.approx(1.0, abs=1e-5)
  assert m["pet/mae_body"] == 0.0 and m["pet/mae_lesion"] == 0.0
  assert m["pet/lesion_mean_real"] == m["pet/lesion_mean_generated"]


def test_lesion_mae_and_psnr_by_hand_in_suv():
  # PET 0..10 SUV over [-1, 1]: model value v -> SUV 5 (v + 1).
  real = np.full((1, 16, 16, 1), -1.0, np.float32)         # 0 SUV background
  real[0, 2:4, 2:4] = 0.2                                  # lesion: 6 SUV
  gen = real.copy()
  gen[0, 2:4, 2:3] = -0.2                                  # half of it: 4 SUV
  gen[0, 10, 10] = -0.8                                    # outside: 1 SUV
  lesion = np.zeros((1, 16, 16), np.uint8)
  lesion[0, 2:4, 2:4] = 1
  body = np.zeros((1, 16, 16), bool)
  body[0, :8, :8] = True                                   # excludes (10, 10)
  m = tmetrics.translation_metrics(real, gen, INFO, ("pet",), body_mask=body,
                                   lesion_mask=lesion, filter_size=7)
  # Lesion: 4 voxels, 2 off by 2 SUV -> MAE 1 SUV; body: 2 * 2 / 64.
  assert m["pet/mae_lesion"] == pytest.approx(1.0, abs=1e-5)
  assert m["pet/mae_body"] == pytest.approx(4.0 / 64, abs=1e-6)
  assert m["pet/lesion_mean_real"] == pytest.approx(6.0, abs=1e-5)
  assert m["pet/lesion_mean_generated"] == pytest.approx(5.0, abs=1e-5)
  # Lesion PSNR on [0, 10]: MSE = (2/10)^2 / 2 = 0.02.
  assert m["pet/psnr_lesion"] == pytest.approx(10 * np.log10(1 / 0.02), abs=1e-4)


def test_three_plane_metrics_for_volumes_and_baseline_comparison():
  rng = np.random.default_rng(1)
  real = rng.uniform(-1, 1, (1, 8, 8, 8, 1)).astype(np.float32)
  gen = np.clip(real + rng.normal(0, 0.1, real.shape), -1, 1).astype(np.float32)
  worse = np.clip(real + rng.normal(0, 0.3, real.shape), -1, 1).astype(np.float32)
  m = tmetrics.translation_metrics(real, gen, INFO, ("pet",), filter_size=3)
  b = tmetrics.translation_metrics(real, worse, INFO, ("pet",), filter_size=3)
  for plane in ("axial", "coronal", "sagittal"):
    assert f"pet/psnr_{plane}" in m
  cmp = tmetrics.compare_to_baseline(m, b)
  assert cmp["pet/psnr"]["better"] > 0 and cmp["pet/mae_body"]["better"] > 0
  assert cmp["pet/mae_body"]["better"] == pytest.approx(
      b["pet/mae_body"] - m["pet/mae_body"])


def test_metric_input_errors():
  x = np.zeros((1, 16, 16, 1), np.float32)
  with pytest.raises(ValueError, match="channels"):
    tmetrics.translation_metrics(x, x, INFO, ("ct", "pet"))
  with pytest.raises(ValueError, match="body_mask"):
    tmetrics.translation_metrics(x, x, INFO, ("pet",), body_mask=np.ones((16, 16)))
  with pytest.raises(ValueError, match="data_range"):
    tmetrics.masked_psnr(x, x, np.ones((1, 16, 16), bool), data_range=(1, 1))


def test_translate_arrays_batches_in_order():
  images = np.arange(5 * 2 * 2 * 1, dtype=np.float32).reshape(5, 2, 2, 1)
  cond = {"lesion": np.arange(5)}
  out = tmetrics.translate_arrays(lambda x, c: x * 2 + c["lesion"][:, None, None, None],
                                  images, cond, batch_size=2)
  np.testing.assert_array_equal(out, images * 2 + np.arange(5)[:, None, None, None])


# ---- end to end (slow: compiling the real quick models on 2 loaded cores) ----

@pytest.mark.slow
def test_ct2pet_quick_trains_and_evaluates_against_the_unet(tmp_path):
  from medgen_jax.eval import evaluate as evaluate_lib
  from medgen_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  runs = {}
  for variant in ("quick", "quick,unet"):
    config = phantom_ct2pet.get_config(variant)
    config.data.data_dir = str(tmp_path / "tfds")
    run = str(tmp_path / variant.replace(",", "_"))
    summary = train_and_evaluate(config, run)
    assert summary["steps"] == config.train.num_steps
    assert np.isfinite(summary["last_metrics"]["recon_l1"])
    assert os.path.exists(os.path.join(run, "samples", "step_000002.png"))
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    assert "recon_l1" in json.loads(lines[-1])
    runs[variant] = (config, run)
  config, run = runs["quick"]
  config.baseline_workdir = runs["quick,unet"][1]
  metrics = evaluate_lib.evaluate(config, run)
  for key in ("pet/psnr", "pet/ssim", "pet/mae_body", "pet/psnr_body"):
    assert np.isfinite(metrics["model"][key]) and np.isfinite(metrics["baseline"][key])
  assert metrics["checkpoint_step"] == 2
  assert set(metrics["comparison"]) >= {"pet/psnr", "pet/mae_body"}
  assert os.path.exists(os.path.join(run, "eval", "translation_metrics.json"))
