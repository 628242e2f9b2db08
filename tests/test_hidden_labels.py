"""data.hide_labels: the train split read with one site's labels unknown."""
import numpy as np
import pytest

from configs import data_phantom
from medgen_jax import classifier
from medgen_jax import data as data_lib
from medgen_jax.data import hidden_labels


@pytest.fixture(scope="module")
def quick_data():
  config = data_phantom.get_config("quick")
  return config, data_lib.load_info(config)


def test_parse_rules_and_errors(quick_data):
  _, info = quick_data
  rules = hidden_labels.parse_hidden_labels("lesion:site=3; age : site = 1", info)
  assert rules == (hidden_labels.HiddenLabel("lesion", "site", 3),
                   hidden_labels.HiddenLabel("age", "site", 1))
  assert hidden_labels.parse_hidden_labels("", info) == ()
  for text, match in (("lesion", "must look like"), ("lesion:site", "must look like"),
                      ("tumour:site=1", "no condition 'tumour'"),
                      ("lesion:age=50", "must be categorical"),
                      ("lesion:site=9", "out of range")):
    with pytest.raises(ValueError, match=match):
      hidden_labels.parse_hidden_labels(text, info)


def test_hide_sets_unknown_only_where_selected(quick_data):
  _, info = quick_data
  batch = {"lesion": np.array([0, 1, 2, 1], np.int32),
           "age": np.array([30, 40, 50, 60], np.float32),
           "site": np.array([3, 0, 3, 1], np.int32)}
  rules = hidden_labels.parse_hidden_labels("lesion:site=3;age:site=0", info)
  out = hidden_labels.hide(batch, rules, info)
  np.testing.assert_array_equal(out["lesion"], [-1, 1, -1, 1])
  np.testing.assert_array_equal(out["age"], [30, np.nan, 50, 60])
  np.testing.assert_array_equal(out["site"], batch["site"])
  np.testing.assert_array_equal(batch["lesion"], [0, 1, 2, 1])  # input untouched


def test_train_split_hidden_test_split_kept(quick_data):
  config, _ = quick_data
  full = data_lib.load_arrays(config, split="train")
  hidden_config = data_phantom.get_config("quick")
  hidden_config.hide_labels = "lesion:site=2"
  hidden = data_lib.load_arrays(hidden_config, split="train")
  at_site = full["site"] == 2
  assert at_site.any() and (~at_site).any()
  np.testing.assert_array_equal(hidden["lesion"][at_site], -1)
  np.testing.assert_array_equal(hidden["lesion"][~at_site], full["lesion"][~at_site])
  np.testing.assert_array_equal(hidden["image"], full["image"])
  np.testing.assert_array_equal(data_lib.load_arrays(hidden_config, split="test")["lesion"],
                                data_lib.load_arrays(config, split="test")["lesion"])
  # The training iterator reads the same labels as load_arrays.
  iterator, _ = data_lib.load_dataset(hidden_config, split="train", batch_size=4, seed=0,
                                      shuffle=False)
  batch = next(iterator)
  np.testing.assert_array_equal(batch["lesion"], hidden["lesion"][:4])


def test_bad_rule_fails_at_load_info_and_changes_the_teacher_cache_key(quick_data):
  config, info = quick_data
  bad = data_phantom.get_config("quick")
  bad.hide_labels = "lesion:site=7"
  with pytest.raises(ValueError, match="out of range"):
    data_lib.load_info(bad)
  hidden = data_phantom.get_config("quick")
  hidden.hide_labels = "lesion:site=2"
  recipe = classifier.Recipe()
  assert (classifier.cache_path(config, info, recipe)
          != classifier.cache_path(hidden, info, recipe))


def test_keep_rule_parses_and_rejects_bad_forms(quick_data):
  _, info = quick_data
  rule = hidden_labels.parse_hidden_labels("lesion:keep=5,seed=2,of=none|large", info)
  assert rule == (hidden_labels.KeepLabels("lesion", 5, 2, (0, 2)),)
  assert hidden_labels.parse_hidden_labels("lesion:keep=3", info) == (
      hidden_labels.KeepLabels("lesion", 3, 0, (0, 1, 2)),)
  text = hidden_labels.keep_rule("lesion", 5, 2, ("none", "large"))
  assert hidden_labels.parse_hidden_labels(text, info) == rule
  for text, match in (("lesion:keep=0", "must look like"), ("lesion:keep=x", "must look like"),
                      ("lesion:keep=4,sed=1", "must look like"),
                      ("age:keep=4", "must be categorical"),
                      ("lesion:keep=4,of=huge", "unknown class"),
                      ("tumour:keep=4", "no condition 'tumour'")):
    with pytest.raises(ValueError, match=match):
      hidden_labels.parse_hidden_labels(text, info)


def test_keep_indices_by_hand():
  values = np.array([0, 1, 2, 2, 0, 1, 0])
  rule = hidden_labels.KeepLabels("lesion", 3, 4, (0, 2))
  candidates = np.array([0, 2, 3, 4, 6])  # the examples of classes 0 and 2, stored order
  want = candidates[np.random.default_rng(4).permutation(5)[:3]]
  np.testing.assert_array_equal(hidden_labels.keep_indices(values, rule), want)
  # Nested in num for one seed.
  two = hidden_labels.keep_indices(values, hidden_labels.KeepLabels("lesion", 2, 4, (0, 2)))
  np.testing.assert_array_equal(two, want[:2])
  with pytest.raises(ValueError, match="only 5 examples"):
    hidden_labels.keep_indices(values, hidden_labels.KeepLabels("lesion", 6, 0, (0, 2)))


def test_keep_rule_reads_exactly_n_labels_in_arrays_and_iterator(quick_data):
  config, _ = quick_data
  full = data_lib.load_arrays(config, split="train")
  kept_config = data_phantom.get_config("quick")
  kept_config.hide_labels = "lesion:keep=5,seed=1,of=none|large"
  kept = data_lib.load_arrays(kept_config, split="train")
  rule = hidden_labels.KeepLabels("lesion", 5, 1, (0, 2))
  where = hidden_labels.keep_indices(full["lesion"], rule)
  known = np.flatnonzero(kept["lesion"] >= 0)
  np.testing.assert_array_equal(known, np.sort(where))
  np.testing.assert_array_equal(kept["lesion"][known], full["lesion"][known])
  assert set(full["lesion"][known]) <= {0, 2}
  np.testing.assert_array_equal(kept["site"], full["site"])  # other fields kept
  # The shuffled training iterator reads the same labels (mapped at stored indices).
  iterator, _ = data_lib.load_dataset(kept_config, split="train", batch_size=len(full["lesion"]),
                                      seed=3, shuffle=True)
  for _ in range(2):  # two epochs: the second reads the same labels
    batch = next(iterator)
    assert int((batch["lesion"] >= 0).sum()) == 5
    order = [int(np.flatnonzero((full["image"] == im).all(axis=(1, 2, 3)))[0])
             for im in batch["image"]]
    np.testing.assert_array_equal(batch["lesion"], kept["lesion"][order])
  too_many = data_phantom.get_config("quick")
  too_many.hide_labels = f"lesion:keep={len(full['lesion']) + 1}"
  with pytest.raises(ValueError, match="keeps"):
    data_lib.load_arrays(too_many, split="train")
