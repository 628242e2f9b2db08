"""The cross-site experiment: arms, requested sites, held-out tests, gap closed,
the refusal of a generator that saw the target's labels, a multi-site folder."""
import json
import os

import numpy as np
import pytest

from configs import downstream_cross_site
from conftest import ct_volume, write_nifti
from medgen_jax import data as data_lib
from medgen_jax.studies import classification as cls_lib
from medgen_jax.studies import cross_site


def _recording_generator(log, train, field="lesion"):
  """Real train images of the requested class; records what was requested."""
  def generate(cond, seed):
    log.append({k: np.asarray(v) for k, v in cond.items()})
    rng = np.random.default_rng(seed)
    return np.stack([train["image"][rng.choice(np.flatnonzero(train[field] == c))]
                     for c in cond[field]])
  return generate


def test_quick_cross_site(tmp_path, monkeypatch):
  config = downstream_cross_site.get_config("quick")
  train = data_lib.load_arrays(config.data, split="train")
  log, trained = [], []
  real_train = cls_lib.train_and_test

  def recording_train_and_test(images, labels, *args, **kwargs):
    trained.append((np.asarray(images), np.asarray(labels)))
    return real_train(images, labels, *args, **kwargs)

  monkeypatch.setattr(cls_lib, "train_and_test", recording_train_and_test)
  res = cross_site.run_cross_site(config, str(tmp_path),
                                  generators={"gan": _recording_generator(log, train)})
  # Every real image a classifier saw carries its own label: the source and
  # target-labelled rows are drawn as whole examples (none/large = 0/2 -> 0/1).
  task_label = {0: 0, 2: 1}
  by_image = {train["image"][i].tobytes(): (task_label.get(int(train["lesion"][i])),
                                            int(train["site"][i]))
              for i in range(len(train["image"]))}
  arms = ["source", "target_labelled", "gan@target", "gan@source"]
  for (images, labels), arm in zip(trained, arms * len(config.seeds)):
    real = images[:config.num_real + (config.num_synthetic if arm == "target_labelled" else 0)]
    for image, label in zip(real, labels):
      assert by_image[image.tobytes()][0] == int(label), arm
    sites = [by_image[image.tobytes()][1] for image in real]
    assert all(s != 3 for s in sites[:config.num_real])
    if arm == "target_labelled":
      assert all(s == 3 for s in sites[config.num_real:])
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert list(saved["arms"]) == ["source", "target_labelled", "gan@target", "gan@source"]
  # Per seed: one set for the target site, one for the source sites' mix.
  assert len(log) == 2 * len(config.seeds)
  for at_target, at_source in zip(log[::2], log[1::2]):
    np.testing.assert_array_equal(at_target["site"], 3)
    assert (at_source["site"] != 3).all()
    for cond in (at_target, at_source):
      assert len(cond["lesion"]) == config.num_synthetic
      assert set(cond["lesion"].tolist()) <= {0, 2}
  held = [data_lib.load_arrays(config.data, split=s) for s in config.test_splits]
  site = np.concatenate([h["site"] for h in held])
  task_class = np.isin(np.concatenate([h["lesion"] for h in held]), [0, 2])
  assert saved["protocol"]["num_test"] == {"target": int((task_class & (site == 3)).sum()),
                                           "source": int((task_class & (site != 3)).sum())}
  runs = saved["runs"]
  for arm, entry in saved["arms"].items():
    for t in cross_site.TESTS:
      mine = [r[t] for r in runs if r["arm"] == arm]
      assert entry[t]["macro_f1"]["values"] == [r["macro_f1"] for r in mine]
      assert sum(map(sum, mine[0]["confusion"])) == saved["protocol"]["num_test"][t]
  oracle = saved["arms"]["target_labelled"]["target"]["paired_difference"]["accuracy"]["mean"]
  gain = saved["arms"]["gan@target"]["target"]["paired_difference"]["accuracy"]["mean"]
  closed = saved["arms"]["gan@target"]["target"]["gap_closed"]["accuracy"]
  if oracle > 0:
    assert closed == pytest.approx(gain / oracle)
  else:
    assert np.isnan(closed)
  assert os.path.getsize(res["figure"]) > 1000


def test_refuses_a_generator_that_saw_the_target_labels(tmp_path, monkeypatch):
  monkeypatch.setattr(cls_lib, "train_and_test", lambda *a, **k: pytest.fail("trained"))
  config = downstream_cross_site.get_config("quick")
  config.generator_configs.gan.data.hide_labels = ""
  with pytest.raises(ValueError, match="hide_labels to 'lesion:site=3'"):
    cross_site.run_cross_site(config, str(tmp_path))
  config = downstream_cross_site.get_config("quick")
  config.generator_configs.gan.data.hide_labels = "lesion:site=2"  # the wrong site
  with pytest.raises(ValueError, match="without the target site's labels"):
    cross_site.run_cross_site(config, str(tmp_path))
  for change, match in ((dict(target_site="9"), "out of range"),
                        (dict(site_field="age"), "categorical"),
                        (dict(num_synthetic=1000), "fewer than the 1000")):
    config = downstream_cross_site.get_config("quick")
    config.update(change)
    with pytest.raises(ValueError, match=match):
      cross_site.run_cross_site(config, str(tmp_path), generators={})


@pytest.mark.slow  # builds a folder dataset and trains classifiers (~9 s); the phantom run stays
def test_runs_on_a_multi_site_folder(tmp_path):
  """A researcher's folder with `site` and `dx` columns in its labels CSV."""
  src = tmp_path / "src"
  src.mkdir()
  rows = ["subject,site,dx"]
  for i in range(24):
    write_nifti(src / f"p{i}.nii.gz", ct_volume(i, (4, 16, 16)))
    rows.append(f"p{i},{['north', 'south', 'east'][i % 3]},{['neg', 'pos'][(i // 3) % 2]}")
  (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
  config = downstream_cross_site.get_config("quick,folder")
  config.data.update(source_dir=str(src), labels_csv=str(tmp_path / "labels.csv"),
                     data_dir=str(tmp_path / "tfds"), split_fractions=(0.5, 0.25, 0.25))
  config.update(field="dx", classes=("neg", "pos"), target_site="east", num_real=4,
                num_synthetic=2)
  # The generator reads the same folder without being told twice.
  assert config.generator_configs.gan.data.source_dir == str(src)
  train = data_lib.load_arrays(config.data, split="train")
  log = []
  res = cross_site.run_cross_site(config, str(tmp_path / "out"),
                                  generators={"gan": _recording_generator(log, train, "dx")})
  east = data_lib.load_info(config.data).condition("site").parse("east")
  np.testing.assert_array_equal(log[0]["site"], east)
  assert res["protocol"]["target_site"] == "east"
  assert res["protocol"]["num_test"]["target"] > 0
