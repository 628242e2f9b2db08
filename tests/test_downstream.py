"""The augmentation learning curve and its classifier pieces: metrics by hand,
intervals against the t formula, protocol of a quick run."""
import json
import os

import numpy as np
import pytest

from configs import downstream_lesion
from medgen_jax import data as data_lib
from medgen_jax.studies import classification as cls_lib
from medgen_jax.studies import downstream


def test_metrics_hand_computed():
  true = [0, 0, 1, 1, 2, 2]
  pred = [0, 1, 1, 1, 0, 2]
  # class 0: tp 1 fp 1 fn 1 -> 2/4; class 1: tp 2 fp 1 fn 0 -> 4/5;
  # class 2: tp 1 fp 0 fn 1 -> 2/3.
  assert cls_lib.macro_f1(pred, true, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
  assert cls_lib.accuracy(pred, true) == pytest.approx(4 / 6)
  # Recalls 1/2, 2/2, 1/2.
  assert cls_lib.balanced_accuracy(pred, true, 3) == pytest.approx(2 / 3)
  # Imbalanced: 9 of class 0 all right, 1 of class 1 wrong -> accuracy 0.9, balanced 0.5.
  assert cls_lib.balanced_accuracy([0] * 10, [0] * 9 + [1], 2) == pytest.approx(0.5)
  # Class 2 never occurs in labels nor predictions: left out of the mean.
  assert cls_lib.macro_f1([0, 1], [0, 1], 3) == 1.0
  # Predicted but absent class scores 0.
  assert cls_lib.macro_f1([0, 2], [0, 0], 3) == pytest.approx((2 / 3 + 0) / 2)
  np.testing.assert_array_equal(cls_lib.confusion(pred, true, 3),
                                [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
  with pytest.raises(ValueError, match="outside"):
    cls_lib.confusion([3], [0], 3)


def test_summary_is_the_student_t_interval():
  s = cls_lib.summary([1.0, 2.0, 3.0])
  # mean 2, sd 1, t(0.975, 2 dof) = 4.302653 (tables): half-width 4.302653 / sqrt(3).
  assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0)
  assert s["ci_high"] - 2.0 == pytest.approx(4.302653 / np.sqrt(3), rel=1e-6)
  assert s["ci_low"] == pytest.approx(4.0 - s["ci_high"])
  paired = cls_lib.summarise(
      [{"macro_f1": 0.6, "balanced_accuracy": 0.5, "accuracy": 0.5}] * 2,
      [{"macro_f1": 0.5, "balanced_accuracy": 0.5, "accuracy": 0.4}] * 2)
  assert paired["paired_difference"]["macro_f1"]["values"] == pytest.approx([0.1, 0.1])
  assert paired["paired_difference"]["macro_f1"]["ci_low"] == pytest.approx(0.1)


def test_class_task_keeps_and_relabels_a_subset():
  info = data_lib.load_info(downstream_lesion.get_config("quick").data)
  task = cls_lib.class_task(info, "lesion", ("large", "none"))
  assert task.kept == (2, 0) and task.task_field.class_names == ("large", "none")
  np.testing.assert_array_equal(task.to_task([0, 1, 2, -1]), [1, -1, 0, -1])
  np.testing.assert_array_equal(cls_lib.nested_balanced(task, 5), [2, 0, 2, 0, 2])
  assert cls_lib.class_task(info, "lesion").kept == (0, 1, 2)
  for classes, match in ((("none",), ">= 2 distinct"), (("none", "none"), ">= 2 distinct"),
                         (("none", "huge"), "unknown class")):
    with pytest.raises(ValueError, match=match):
      cls_lib.class_task(info, "lesion", classes)
  with pytest.raises(ValueError, match="categorical"):
    cls_lib.class_task(info, "age")


def test_quick_learning_curve(tmp_path):
  config = downstream_lesion.get_config("quick")
  train = data_lib.load_arrays(config.data, split="train")
  requested = []

  def oracle(cond, seed):
    """Real training images of the requested class: the best a generator can do."""
    requested.append(cond)
    rng = np.random.default_rng(seed)
    return np.stack([train["image"][rng.choice(np.flatnonzero(train["lesion"] == c))]
                     for c in cond["lesion"]])

  def noise(cond, seed):
    shape = (len(cond["lesion"]), *train["image"].shape[1:])
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)

  res = downstream.run_downstream(config, str(tmp_path),
                                  generators={"oracle": oracle, "noise": noise})
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  sizes = [str(n) for n in config.num_real]
  assert list(saved["curves"]) == ["real", "oracle x1", "oracle x2", "noise x1", "noise x2"]
  protocol = saved["protocol"]
  assert protocol["classes"] == ["none", "large"]
  # One synthetic set per seed of the largest size, balanced in every prefix,
  # only the task's classes (lesion indices 0 and 2).
  assert len(requested) == len(config.seeds)
  for cond in requested:
    assert len(cond["lesion"]) == 2 * config.num_real[-1]
    for m in range(1, len(cond["lesion"]) + 1):
      counts = np.bincount(cond["lesion"][:m], minlength=3)
      assert counts[1] == 0 and abs(int(counts[0]) - int(counts[2])) <= 1
  test_labels = np.concatenate([data_lib.load_arrays(config.data, split=s)["lesion"]
                                for s in config.test_splits])
  num_test = int(np.isin(test_labels, [0, 2]).sum())
  assert protocol["num_test"] == num_test
  runs = saved["runs"]
  assert len(runs) == len(config.seeds) * len(sizes) * 5
  for arm, curve in saved["curves"].items():
    assert list(curve) == sizes
    for n in sizes:
      mine = [r for r in runs if r["arm"] == arm and str(r["num_real"]) == n]
      for metric in cls_lib.METRICS:
        vals = curve[n][metric]["values"]
        assert vals == [r[metric] for r in mine] and len(vals) == len(config.seeds)
        assert curve[n][metric]["mean"] == pytest.approx(np.mean(vals))
      for r in mine:  # the stored confusion reproduces the stored scores
        conf = np.asarray(r["confusion"])
        assert conf.sum() == num_test
        true = np.repeat(np.arange(2), conf.sum(1))
        pred = np.concatenate([np.repeat(np.arange(2), row) for row in conf])
        assert r["macro_f1"] == pytest.approx(cls_lib.macro_f1(pred, true, 2))
        assert r["balanced_accuracy"] == pytest.approx(
            cls_lib.balanced_accuracy(pred, true, 2))
      if arm != "real":
        real = [r for r in runs if r["arm"] == "real" and str(r["num_real"]) == n]
        np.testing.assert_allclose(curve[n]["paired_difference"]["accuracy"]["values"],
                                   [a["accuracy"] - b["accuracy"] for a, b in zip(mine, real)])
  assert os.path.getsize(res["figure"]) > 1000


def test_per_size_generators_see_exactly_the_labels_of_their_real_set():
  config = downstream_lesion.get_config("quick")
  assert config.labels_seen == "per_size"
  info = data_lib.load_info(config.data)
  task = cls_lib.class_task(info, config.field, tuple(config.classes))
  train = downstream.load_task_split(config.data, task, ("train",))
  stored = data_lib.load_arrays(config.data, split="train")
  # Stored index of every row of the task's train arrays (none / large slices).
  rows = np.flatnonzero(np.isin(stored["lesion"], task.kept))
  runs = downstream.generator_runs(config)
  assert sorted(runs) == [("gan", n) for n in config.num_real]
  orders = [downstream.real_order(config, task, train, seed) for seed in config.seeds]
  for seed_order in orders[1:]:  # one labelled set per size, whatever the seed
    np.testing.assert_array_equal(seed_order, orders[0])
  for (_, n), (workdir, gc) in runs.items():
    assert workdir == f"{config.generators.gan}_n{n}"
    seen = data_lib.load_arrays(gc.data, split="train")["lesion"]
    real = rows[orders[0][:n]]
    np.testing.assert_array_equal(np.flatnonzero(seen >= 0), np.sort(real))
    np.testing.assert_array_equal(seen[real], stored["lesion"][real])
  all_labels = downstream_lesion.get_config("quick")
  all_labels.labels_seen = "all"
  assert list(downstream.generator_runs(all_labels)) == [("gan", None)]
  assert not np.array_equal(downstream.real_order(all_labels, task, train, 0),
                            downstream.real_order(all_labels, task, train, 1))


def test_per_size_curve_uses_each_sizes_generator(tmp_path):
  config = downstream_lesion.get_config("quick")
  asked = {}

  def make(n):
    def generate(cond, seed):
      asked.setdefault(n, []).append(len(cond["lesion"]))
      shape = (len(cond["lesion"]), *INFO_SHAPE)
      return np.random.default_rng(seed + n).uniform(-1, 1, shape).astype(np.float32)
    return generate

  INFO_SHAPE = data_lib.load_info(config.data).image_shape
  res = downstream.run_downstream(
      config, str(tmp_path), generators={"g": {n: make(n) for n in config.num_real}})
  ratio = max(config.synthetic_ratios)
  assert asked == {n: [int(round(ratio * n))] * len(config.seeds) for n in config.num_real}
  curve = res["curves"]["g x1"]
  assert all(curve[str(n)]["generator_labels_seen"] is None for n in config.num_real)
  assert "generator_labels_seen" not in res["curves"]["real"][str(config.num_real[0])]
  assert res["protocol"]["labels_seen"] == "per_size"
  assert res["protocol"]["label_seed"] == config.label_seed


def test_bad_config_fails_before_anything_runs(tmp_path, monkeypatch):
  monkeypatch.setattr(cls_lib, "train_and_test", lambda *a, **k: pytest.fail("trained"))
  cases = [(dict(field="age"), "categorical"), (dict(num_real=(8, 4)), "increasing"),
           (dict(synthetic_ratios=(0.0,)), "positive"), (dict(seeds=(0,)), ">= 2 seeds"),
           (dict(classes=("none",)), ">= 2 distinct"),
           (dict(labels_seen="some"), "labels_seen")]
  for change, match in cases:
    config = downstream_lesion.get_config("quick")
    config.update(change)
    with pytest.raises(ValueError, match=match):
      downstream.run_downstream(config, str(tmp_path), generators={})
  config = downstream_lesion.get_config("quick")
  config.generator_configs.gan.data.image_size = 64
  with pytest.raises(ValueError, match="other data"):
    downstream.run_downstream(config, str(tmp_path))
  config = downstream_lesion.get_config("quick")
  config.generator_configs.gan.data.hide_labels = "lesion:site=1"
  with pytest.raises(ValueError, match="per real-set size"):
    downstream.run_downstream(config, str(tmp_path))
  with pytest.raises(ValueError, match="reserved"):
    downstream.run_downstream(downstream_lesion.get_config("quick"), str(tmp_path),
                              generators={"real": None})


def test_each_config_names_an_experiment_of_the_entry_point():
  from configs import downstream_cross_site
  from experiments import downstream as entry
  for config in (downstream_lesion.get_config(), downstream_cross_site.get_config()):
    check, run = entry.EXPERIMENTS[config.experiment]
    assert run.__module__ == check.__module__


def test_unfinished_generators_resume_and_a_preempted_one_stops_the_study(monkeypatch):
  from experiments import downstream as entry
  config = downstream_lesion.get_config("quick")
  runs = downstream.generator_runs(config)
  (first, first_config), (second, _) = list(runs.values())
  steps = first_config.train.num_steps
  done = {first: steps - 1, second: steps}  # interrupted, finished
  trained = []

  def train(generator_config, workdir):
    trained.append(workdir)
    return {"preempted": False}

  monkeypatch.setattr(entry.ckpt_lib, "latest_step", done.get)
  monkeypatch.setattr(entry, "train_and_evaluate", train)
  entry.train_missing_generators(config)
  assert trained == [first]
  done.update({first: steps, second: None})  # finished, never started
  entry.train_missing_generators(config)
  assert trained == [first, second]
  monkeypatch.setattr(entry, "train_and_evaluate", lambda c, w: {"preempted": True})
  with pytest.raises(SystemExit, match="preempted"):
    entry.train_missing_generators(config)
