"""The evaluation judge (medgen_jax/classifier/judge.py): fresh renders are the
phantom's own renderer on subjects outside every split, the judge is cached
under a key that names its data, its readings are reported, and it may not
be the network the samples were made with."""

import numpy as np
import pytest

from configs import phantom_gan
from medgen_jax import classifier
from medgen_jax import data as data_lib
from medgen_jax.classifier import judge as judge_lib
from medgen_jax.data import builders_phantom
from medgen_jax.data.info import CATEGORICAL
from medgen_jax.eval import evaluate as ev
from medgen_jax.eval import reference, scoring
from medgen_jax.metrics import fidelity
from medgen_jax.eval import settings as settings_lib


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  config = phantom_gan.get_config("quick")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.eval.update(extractor_widths=(8,), extractor_feature_dim=8,
                     extractor_batch_size=8, num_pairs=2, grid_cols=2)
  return config


def test_fresh_renders_are_new_subjects_of_the_same_renderer(config):
  data = config.data
  test = data_lib.load_arrays(data, split="test")
  # The split's records are the renderer's stream 2 (test): rebuilding them
  # through the fresh-render path gives the stored images bit for bit (the
  # stored order is shuffled).
  per_subject = int(data.slices_per_subject)
  info = data_lib.load_info(data)
  for subject in range(int(data.num_subjects.test)):
    for r in builders_phantom.subject_records(data, 2, subject):
      want = info.intensity[0].to_model(r["ct"])[..., None]
      assert any(np.array_equal(x, want) for x in test["image"]), subject
  fresh = data_lib.render_fresh_arrays(data, num_subjects=3)
  assert fresh["image"].shape == (3 * per_subject,) + tuple(info.image_shape)
  assert fresh["image"].min() >= -1 and fresh["image"].max() <= 1
  # No fresh subject is a subject of any split.
  split_ids = {r["subject"] for split in range(3)
               for s in range(int(data.num_subjects[("train", "validation", "test")[split]]))
               for r in builders_phantom.subject_records(data, split, s)}
  fresh_ids = {r["subject"] for r in builders_phantom.fresh_records(data, 3)}
  assert len(fresh_ids) == 3 and not fresh_ids & split_ids
  for f in info.conditions:
    assert fresh[f.name].shape == (3 * per_subject,)
    if f.kind == CATEGORICAL:
      assert fresh[f.name].min() >= 0  # every label known


def test_fresh_renders_need_the_renderer(config):
  folder = config.data.copy_and_resolve_references()
  folder.name = "medical_folder"
  with pytest.raises(ValueError, match="fresh renders need the ct_phantom renderer"):
    data_lib.render_fresh_arrays(folder, num_subjects=2)
  assert judge_lib.judge_kind(config.judge, folder) == judge_lib.TRAIN_SPLIT
  with pytest.raises(ValueError, match="judge.subjects must be >= 0"):
    judge_lib.judge_recipe({**config.judge, "subjects": -1})


def test_judge_is_trained_on_fresh_renders_and_cached(config):
  info = data_lib.load_info(config.data)
  judge = judge_lib.get_judge(config.judge, config.data, info)
  assert judge.kind == judge_lib.FRESH_RENDERS and not judge.meta["reused"]
  assert judge.meta["key"]["source"] == {"kind": "fresh_renders",
                                         "subjects": int(config.judge.subjects)}
  n_fresh = int(config.judge.subjects) * int(config.data.slices_per_subject)
  assert judge.meta["num_train_images"] == n_fresh
  again = judge_lib.get_judge(config.judge, config.data, info)
  assert again.meta["reused"] and again.meta["path"] == judge.meta["path"]
  # The same recipe on the real train split is another classifier.
  split = dict(config.judge, subjects=0)
  recipe, _ = judge_lib.judge_recipe(split)
  assert judge_lib.judge_kind(split, config.data) == judge_lib.TRAIN_SPLIT
  assert classifier.cache_path(config.data, info, recipe) != judge.meta["path"]


def test_scoring_reports_the_judges_reading(config):
  s = settings_lib.eval_settings(config)
  info = data_lib.load_info(config.data)
  train, test = reference.load_real(config.data, s)
  model, params, _ = classifier.get_classifier(settings_lib.extractor_recipe(s),
                                               config.data, info, train=train)
  judge = judge_lib.get_judge(config.judge, config.data, info)
  requested = {f.name: test[f.name] for f in info.conditions}
  shuffled = {k: np.roll(v, 1) for k, v in requested.items()}
  m = scoring.evaluate_images(test["image"], shuffled, real_train=train, real_test=test,
                              info=info, model=model, params=params, settings=s,
                              judge=judge)
  read = classifier.predict_conditions(judge.model, judge.params, test["image"])
  # Independent: the judge's predictions scored by hand.
  lesion = info.conditions[0]
  assert lesion.name == "lesion"
  np.testing.assert_allclose(m["judge_lesion_accuracy"],
                             np.mean(read["lesion"] == shuffled["lesion"]))
  np.testing.assert_allclose(m["judge_lesion_accuracy_real_reference"],
                             np.mean(read["lesion"] == test["lesion"]))
  np.testing.assert_allclose(m["judge_age_mae"],
                             np.mean(np.abs(read["age"] - shuffled["age"])), rtol=1e-5)
  want = fidelity.condition_fidelity(read, test, info.conditions)
  for key, value in want.items():
    np.testing.assert_allclose(m[f"judge_{key}_real_reference"], value)
  # Without a judge there is no judge reading.
  plain = scoring.evaluate_images(test["image"], requested, real_train=train,
                                  real_test=test, info=info, model=model, params=params,
                                  settings=s)
  assert not any(k.startswith("judge_") for k in plain)


def test_probe_reads_the_real_test_split_as_the_reports_real_reference(config):
  from medgen_jax.studies import probe
  info = data_lib.load_info(config.data)
  judge = judge_lib.get_judge(config.judge, config.data, info)
  out = probe.probe_judge(config)
  assert out["judge_reused"] and out["train_s"] == 0.0  # the cached judge
  assert out["judge_kind"] == judge_lib.FRESH_RENDERS and out["judge_path"] == judge.meta["path"]
  test = data_lib.load_arrays(config.data, split="test")
  read = classifier.predict_conditions(judge.model, judge.params, test["image"])
  assert out["num_test"] == len(test["lesion"])
  np.testing.assert_allclose(out["lesion_accuracy"], np.mean(read["lesion"] == test["lesion"]))
  np.testing.assert_allclose(out["site_accuracy"], np.mean(read["site"] == test["site"]))
  np.testing.assert_allclose(out["age_mae"], np.mean(np.abs(read["age"] - test["age"])),
                             rtol=1e-5)
  without = config.copy_and_resolve_references()
  del without["judge"]
  with pytest.raises(ValueError, match="no judge section"):
    probe.probe_judge(without)


def test_judge_sharing_the_teachers_seed_fails_before_any_work(config, tmp_path):
  bad = config.copy_and_resolve_references()
  bad.judge.seed = bad.teacher.seed
  with pytest.raises(ValueError, match=r"teacher.seed 1 must differ from judge.seed 1"):
    ev.evaluate(bad, str(tmp_path / "no_checkpoint_here"))
