"""evaluate: known answers (real test "as generated" equals its reference,
copied training images are flagged), extractor cache, errors, end to end."""
import json
import os

import numpy as np
import pytest

from configs import phantom_gan
from medgen_jax import classifier
from medgen_jax import data as data_lib
from medgen_jax.eval import baseline as baseline_lib
from medgen_jax.eval import reference, scoring
from medgen_jax.eval import evaluate as ev
from medgen_jax.eval import settings as eval_settings_lib
from medgen_jax.train import checkpoint as ckpt_lib

REQUIRED = ("fd_domain", "kid_domain", "precision", "recall", "density",
            "coverage", "lesion_accuracy", "site_accuracy", "age_mae",
            "lesion_diameter_error_mm", "hu_w1", "memorized_fraction",
            "memorized_fraction_pixel")
TINY = dict(extractor_steps=6, extractor_batch_size=8, extractor_widths=(8,),
            extractor_feature_dim=8, kid_subsets=3, bootstrap_resamples=3,
            num_pairs=3, grid_cols=2)


def _config(extractor_path, **overrides):
  config = phantom_gan.get_config("quick")
  config.eval = {**TINY, "extractor_path": str(extractor_path), **overrides}
  return config


def _get_extractor(config, info, train, s):
  """The evaluation's extractor as `reference.load_reference` gets it."""
  return classifier.get_classifier(eval_settings_lib.extractor_recipe(s), config.data, info,
                                   train=train, path=s["extractor_path"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  ext = tmp_path_factory.mktemp("extractor") / "phantom"
  config = _config(ext)
  s = eval_settings_lib.eval_settings(config)
  info = data_lib.load_info(config.data)
  train, test = reference.load_real(config.data, s)
  model, params, meta = _get_extractor(config, info, train, s)
  return dict(config=config, s=s, info=info, train=train, test=test,
              model=model, params=params, meta=meta, ext=ext)


def _evaluate(setup, images, requested, figures_dir=None, baseline=None):
  return scoring.evaluate_images(images, requested, real_train=setup["train"],
                            real_test=setup["test"], info=setup["info"],
                            model=setup["model"], params=setup["params"],
                            settings=setup["s"], figures_dir=figures_dir,
                            baseline=baseline)


def test_real_test_as_generated_matches_reference(setup, tmp_path):
  info, test = setup["info"], setup["test"]
  requested = {f.name: test[f.name] for f in info.conditions}
  m = _evaluate(setup, test["image"], requested, figures_dir=str(tmp_path))
  for key in REQUIRED:
    assert np.isfinite(m[key]), key
    assert np.isfinite(m[f"{key}_real_reference"]), key
  # Same images, same conditions: every metric is its own reference.
  for key in [k for k in m if f"{k}_real_reference" in m]:
    a, b = m[key], m[f"{key}_real_reference"]
    assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b), key
  assert m["num_samples"] == m["num_real_test"] == len(test["image"])
  assert 0.0 <= m["fd_domain_ci_low"] <= m["fd_domain"] <= m["fd_domain_ci_high"]
  # New patients are not copies: the real reference reads ~0 in both spaces.
  assert m["memorized_fraction_real_reference"] <= 0.05
  assert m["memorized_fraction_pixel_real_reference"] <= 0.05
  assert m["memorization_threshold"] > 0 and m["memorization_threshold_pixel"] > 0
  assert f"of {len(test['image'])} test" in m["memorization_threshold_rule"]
  for name in ("samples_lesion", "samples_site", "memorization_features",
               "memorization_pixels", "hu_histograms"):
    assert os.path.getsize(m["figures"][name]) > 1000, name


def test_copied_training_images_are_flagged(setup):
  info, train = setup["info"], setup["train"]
  idx = np.arange(8)
  requested = {f.name: train[f.name][idx] for f in info.conditions}
  m = _evaluate(setup, train["image"][idx], requested)
  # Distance 0 to a training image is below any positive threshold.
  assert m["memorized_fraction"] == 1.0
  assert m["memorized_fraction_pixel"] == 1.0
  assert m["memorized_fraction_pixel_real_reference"] < 0.5
  assert m["nearest_train_distance_median_pixel"] == pytest.approx(0.0, abs=1e-3)
  # Precision of training copies against the training set is perfect.
  assert m["precision"] == 1.0


def test_baseline_is_scored_as_if_evaluated_alone(setup, tmp_path):
  info, train, test = setup["info"], setup["train"], setup["test"]
  idx = np.arange(8)
  requested = {f.name: train[f.name][idx] for f in info.conditions}
  model_images, baseline_images = test["image"][idx], train["image"][idx]
  joint = _evaluate(setup, model_images, requested, figures_dir=str(tmp_path),
                    baseline=baseline_images)
  alone = _evaluate(setup, model_images, requested)
  baseline_alone = _evaluate(setup, baseline_images, requested)
  scored = [k for k in alone if f"{k}_real_reference" in alone]
  assert scored
  for key in scored:
    assert joint[key] == pytest.approx(alone[key], nan_ok=True), key
    assert joint[f"{key}_real_reference"] == pytest.approx(
        alone[f"{key}_real_reference"], nan_ok=True), key
    assert joint[f"baseline_{key}"] == pytest.approx(baseline_alone[key],
                                                     nan_ok=True), key
  assert joint["baseline_memorized_fraction_pixel"] == 1.0  # training copies
  assert not any(k.startswith("baseline_") and k.endswith("_real_reference")
                 for k in joint)
  figure = joint["figures"]["baseline_samples_lesion"]
  assert os.path.dirname(figure) == os.path.join(str(tmp_path), "baseline")
  assert os.path.getsize(figure) > 1000
  with pytest.raises(ValueError, match="baseline has 7 images"):
    _evaluate(setup, model_images, requested, baseline=baseline_images[:7])


def test_extractor_cache_is_reused(setup):
  assert setup["meta"]["reused"] is False
  params_dir = os.path.join(setup["ext"], "params")
  before = os.path.getmtime(params_dir)
  model, params, meta = _get_extractor(setup["config"], setup["info"], setup["train"],
                                       setup["s"])
  assert meta["reused"] is True
  assert os.path.getmtime(params_dir) == before
  x = setup["test"]["image"][:3]
  np.testing.assert_allclose(
      classifier.extract_features(model, params, x),
      classifier.extract_features(setup["model"], setup["params"], x), rtol=1e-6)
  # Other training settings at the same path: refused, not silently reused.
  other = eval_settings_lib.eval_settings(_config(setup["ext"], extractor_steps=7))
  with pytest.raises(ValueError, match="was trained for"):
    _get_extractor(setup["config"], setup["info"], setup["train"], other)


def test_default_extractor_path_is_keyed_by_settings(setup):
  config = phantom_gan.get_config("quick")
  s1 = eval_settings_lib.eval_settings(config)
  config.eval = {"extractor_steps": 7}
  s2 = eval_settings_lib.eval_settings(config)
  r1, r2 = eval_settings_lib.extractor_recipe(s1), eval_settings_lib.extractor_recipe(s2)
  p1 = classifier.cache_path(config.data, setup["info"], r1)
  p2 = classifier.cache_path(config.data, setup["info"], r2)
  assert p1 != p2 and os.path.basename(p1).startswith("ct_phantom-")
  assert p1 == classifier.cache_path(config.data, setup["info"], r1)
  # An explicit path wins over the key.
  assert classifier.cache_path(config.data, setup["info"], r1, "/x/y") == "/x/y"
  # The key's training block keeps the names of existing caches on disk.
  assert classifier.cache_key(config.data, setup["info"], r1)["training"] == {
      "extractor_steps": 6, "extractor_batch_size": 64, "extractor_lr": 1e-3,
      "extractor_widths": [16, 32, 64], "extractor_feature_dim": 64,
      "extractor_stem_patch": 2, "extractor_pooling": "mean_max", "extractor_seed": 0,
      "max_train": None}


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    ev.evaluate(phantom_gan.get_config("quick"), str(tmp_path))
  # An interrupted orbax save (temporary name) is not a checkpoint.
  os.makedirs(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1")
  assert ckpt_lib.latest_step(str(tmp_path)) is None
  os.makedirs(tmp_path / "checkpoints" / "2")
  assert ckpt_lib.latest_step(str(tmp_path)) == 2


def test_bad_settings():
  config = phantom_gan.get_config("quick")
  config.eval = {"num_sample": 10}
  with pytest.raises(ValueError, match="num_sample"):
    eval_settings_lib.eval_settings(config)
  config.eval = {"num_samples": 1}
  with pytest.raises(ValueError, match="num_samples"):
    eval_settings_lib.eval_settings(config)
  config.eval = {"condition_effect_samples": -1}
  with pytest.raises(ValueError, match="condition_effect_samples"):
    eval_settings_lib.eval_settings(config)


def test_the_judge_is_never_the_teacher():
  config = phantom_gan.get_config("quick")
  config.eval.extractor_seed = int(config.teacher.seed)
  config.selector.candidates = 1  # (the selector is seeded like the teacher)
  with pytest.raises(ValueError, match=r"teacher.seed 1 must differ from "
                                       r"eval.extractor_seed 1"):
    eval_settings_lib.eval_settings(config)
  config.loss.teacher_weight = 0.0  # no teacher: nothing to be independent of
  assert eval_settings_lib.eval_settings(config)["extractor_seed"] == 1
  assert eval_settings_lib.extractor_recipe(config.eval).seed == 1


def test_draw_conditions_keeps_rows_and_balance(setup):
  info, test = setup["info"], setup["test"]
  n = len(test["image"])
  drawn = reference.draw_conditions(test, info, n, seed=3)
  rows = lambda d, m: sorted(zip(*(np.asarray(d[f.name])[:m].tolist()
                                   for f in info.conditions)))
  assert rows(drawn, n) == rows(test, n)  # a permutation of whole rows
  drawn = reference.draw_conditions(test, info, 2 * n + 1, seed=3)
  counts = np.bincount(drawn["lesion"], minlength=3)
  expected = 2 * np.bincount(test["lesion"], minlength=3)
  assert np.all(counts - expected >= 0) and (counts - expected).sum() == 1


def test_lesion_range_error_hand_computed():
  ranges = {0: (0.0, 0.0), 1: (5.0, 10.0), 2: (12.0, 25.0)}
  out = scoring.lesion_range_error([0.0, 3.0, 11.0, 30.0, 7.0], [0, 0, 1, 2, -1],
                              ranges)
  # errors: 0, 3, 1, 5 (the -1 entry is skipped)
  assert out["lesion_diameter_error_mm"] == pytest.approx(9.0 / 4)
  assert out["lesion_size_in_range"] == pytest.approx(0.25)


def test_baseline_config_comes_from_its_run_and_must_match_the_data(tmp_path):
  config = phantom_gan.get_config("quick")
  base = tmp_path / "base"
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    baseline_lib.baseline_generator_config(config, str(base))
  (base / "checkpoints" / "7").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    baseline_lib.baseline_generator_config(config, str(base))
  saved = json.loads(phantom_gan.get_config("quick,cnn").to_json_best_effort())
  (base / "config.json").write_text(json.dumps(saved))
  out = baseline_lib.baseline_generator_config(config, str(base))
  assert out.model.generator == "cnn" and config.model.generator == "transformer"
  assert out.data == config.data
  saved["data"]["image_size"] = 64
  (base / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="data.image_size=64"):
    baseline_lib.baseline_generator_config(config, str(base))


@pytest.mark.slow
def test_evaluate_end_to_end_on_trained_quick_run(tmp_path_factory):
  from medgen_jax.train import train_and_evaluate
  workdir = str(tmp_path_factory.mktemp("run"))
  config = _config(tmp_path_factory.mktemp("ext") / "e", num_samples=9)
  train_and_evaluate(config, workdir)
  m1 = ev.evaluate(config, workdir)
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    saved = json.load(f)
  for key in REQUIRED:
    assert key in saved and f"{key}_real_reference" in saved, key
    assert saved[key] is not None and np.isfinite(saved[key]), key
  assert saved["num_samples"] == 9 and saved["checkpoint_step"] == 3
  assert saved["extractor_reused"] is False
  # Every condition's effect, from min(32, 9 requests) redrawn.
  for field in ("lesion", "site", "age"):
    assert np.isfinite(saved[f"condition_effect_{field}_ratio"]), field
  assert saved["condition_effect_noise"] > 0
  for key in [k for k in saved if k.startswith("figure_")]:
    assert os.path.exists(os.path.join(workdir, "eval", saved[key]))
  m2 = ev.evaluate(config, workdir)
  assert m2["extractor_reused"] is True
  assert m2["fd_domain"] == pytest.approx(m1["fd_domain"])  # same seed, same draw
  # The run as its own baseline: same generator, draws and extractor, so
  # every baseline metric equals the model's.
  with config.unlocked():
    config.baseline_workdir = workdir
  m3 = ev.evaluate(config, workdir)
  assert m3["baseline_checkpoint_step"] == 3
  for key in REQUIRED:
    assert m3[f"baseline_{key}"] == pytest.approx(m3[key], nan_ok=True), key
