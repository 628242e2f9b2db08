"""Best-of-K sampling by the condition selector (medgen_jax/inference/selection.py)."""
import ml_collections
import numpy as np
import pytest

from medgen_jax import classifier
from medgen_jax import data as data_lib
from medgen_jax.data.info import ConditionField
from medgen_jax.eval import settings as eval_settings
from medgen_jax.inference import sample, selection
from medgen_jax.train import loop as train_loop

FIELDS = (ConditionField("lesion", "categorical", num_classes=3),
          ConditionField("age", "continuous", value_range=(20.0, 90.0)))


def _draw(seed):
  """Five 'images' whose values depend on the noise seed only."""
  return np.random.default_rng(seed).normal(size=(5, 4, 4, 1)).astype(np.float32)


def test_best_of_keeps_the_lowest_loss_candidate_per_example():
  target = np.linspace(-1, 1, 5).reshape(5, 1, 1, 1)
  score = lambda images, cond: np.abs(images - target).mean(axis=(1, 2, 3))
  images, chosen = selection.best_of(_draw, score, {}, seed=7, candidates=6)
  # Brute force over every candidate at once.
  every = np.stack([_draw(selection.candidate_seed(7, k)) for k in range(6)])
  losses = np.abs(every - target[None]).mean(axis=(2, 3, 4))       # [K, n]
  want = losses.argmin(axis=0)
  np.testing.assert_array_equal(chosen, want)
  np.testing.assert_array_equal(images, every[want, np.arange(5)])
  assert len(set(want.tolist())) > 1  # the case really mixes candidates


def test_one_candidate_is_plain_sampling():
  def never(images, cond):
    raise AssertionError("one candidate needs no score")
  images, chosen = selection.best_of(_draw, never, {}, seed=3, candidates=1)
  np.testing.assert_array_equal(images, _draw(3))
  assert not chosen.any()
  assert selection.candidate_seed(3, 0) == 3
  assert len({selection.candidate_seed(3, k) for k in range(50)}) == 50


def test_condition_score_is_the_classifiers_per_example_loss():
  model, params = classifier.training.init_extractor(FIELDS, (16, 16, 1), seed=0,
                                                     widths=(4,), feature_dim=8)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (5, 16, 16, 1)).astype(np.float32)
  cond = {"lesion": np.array([0, 2, -1, 1, 2], np.int32),
          "age": np.array([30.0, np.nan, 50.0, 85.0, 20.0], np.float32),
          "site": np.zeros(5, np.int32)}  # a field the classifier does not know
  got = selection.condition_scorer((model, params), batch_size=2)(images, cond)
  # Independent: the training loss of each example alone, unknown fields dropped.
  for i in range(5):
    known = [f for f in FIELDS
             if (cond[f.name][i] >= 0 if f.kind == "categorical" else np.isfinite(cond[f.name][i]))]
    targets = classifier.condition_targets({k: v[i:i + 1] for k, v in cond.items()}, FIELDS)
    _, metrics = classifier.condition_loss(model, params, images[i:i + 1], targets)
    want = sum(float(metrics[f"{f.name}_loss"]) for f in known)
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"\['age'\] missing"):
    selection.condition_scorer((model, params))(images, {"lesion": cond["lesion"]})


def _config(value, teacher_weight=1.0):
  return ml_collections.ConfigDict(dict(selector=dict(candidates=value),
                                        loss=dict(teacher_weight=teacher_weight)))


@pytest.mark.parametrize("value, words", [
    (0, "selector.candidates must be an integer >= 1"),
    (2.5, "selector.candidates must be an integer >= 1"),
])
def test_bad_candidate_counts_are_one_clear_error(value, words):
  with pytest.raises(ValueError, match=words):
    selection.num_candidates(_config(value))


def test_selection_has_its_own_classifier_not_the_teacher():
  assert selection.num_candidates(_config(4)) == 4
  # The selector is its own network (config.selector): no teacher is needed.
  assert selection.num_candidates(_config(4, teacher_weight=0.0)) == 4
  assert selection.num_candidates(_config(1, teacher_weight=0.0)) == 1
  # No selector section (or no count) is plain sampling.
  assert selection.num_candidates(ml_collections.ConfigDict(dict(loss={}))) == 1
  assert selection.num_candidates(ml_collections.ConfigDict(
      dict(selector=dict(candidates=None)))) == 1


def test_the_evaluation_never_judges_with_the_selector():
  from configs import phantom_gan
  config = phantom_gan.get_config("quick")
  config.selector.candidates = 2  # best-of-2 (the default is plain sampling)
  eval_settings.eval_settings(config)  # shipped: selector seed 1, extractor seed 0
  config.selector.seed = int(config.eval.extractor_seed)
  with pytest.raises(ValueError, match=r"selector.seed 0 must differ from "
                                       r"eval.extractor_seed 0"):
    eval_settings.eval_settings(config)
  config.selector.candidates = 1  # plain sampling: no selector is used
  eval_settings.eval_settings(config)


def test_generator_fn_picks_each_image_from_one_of_the_candidates(quick_checkpoint):
  config, workdir, _ = quick_checkpoint
  info_conditions = {"lesion": np.array([0, 1, 2, 0, 1, 2], np.int32),
                     "age": np.full(6, 50.0, np.float32),
                     "site": np.array([0, 1, 2, 3, 0, 1], np.int32)}
  info = data_lib.load_info(config.data)
  conditions = {f.name: info_conditions[f.name] for f in info.conditions}
  plain_config = config.copy_and_resolve_references()
  plain_config.selector.candidates = 1
  plain, _ = sample.generator_fn(plain_config, workdir, info, batch_size=4)
  picked_config = config.copy_and_resolve_references()
  picked_config.selector.candidates = 3
  picked, _ = sample.generator_fn(picked_config, workdir, info, batch_size=4)
  out = picked(conditions, 11)
  every = [plain(conditions, selection.candidate_seed(11, k)) for k in range(3)]
  matches = [[np.array_equal(out[i], c[i]) for c in every] for i in range(6)]
  assert all(any(m) for m in matches), matches
  # The choice is the lowest loss among the three of the classifier of
  # config.selector ('lesion': trained on that field alone), cached by the
  # scorer under its own recipe: not the training run's teacher.
  candidates, score = sample.selection_scorer(picked_config, info)
  assert candidates == 3 and picked_config.selector.fields == "lesion"
  losses = np.stack([score(c, conditions) for c in every])
  recipe = classifier.from_section(picked_config.selector)
  selector, params, meta = classifier.get_classifier(recipe, config.data, info)
  assert meta["reused"] and [f.name for f in selector.fields] == ["lesion"]
  assert meta["path"] != classifier.cache_path(config.data, info,
                                               train_loop.teacher_recipe(config))
  own = selection.condition_scorer((selector, params))
  np.testing.assert_allclose(losses, np.stack([own(c, conditions) for c in every]),
                             rtol=1e-6)
  np.testing.assert_array_equal([m.index(True) for m in matches], losses.argmin(0))


def test_selector_fields_must_be_conditions_of_the_dataset(quick_checkpoint):
  config, _, _ = quick_checkpoint
  config = config.copy_and_resolve_references()
  config.selector.update(fields="lesion,tumour", candidates=2)
  with pytest.raises(ValueError, match=r"selector.fields names \['tumour'\]"):
    sample.selection_scorer(config, data_lib.load_info(config.data))
