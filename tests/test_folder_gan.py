"""configs/folder_gan.py: the GAN on a researcher's own folder, with and without labels."""
import json
import os

import numpy as np
import pytest

from configs import folder_gan
from conftest import ct_volume, write_checkpoint, write_nifti
from medgen_jax import classifier, data
from medgen_jax.data import builders
from medgen_jax.data.info import IntensityTransform
from medgen_jax.eval import evaluate
from medgen_jax.metrics import physical
from medgen_jax.train import loop, validate_config


def _folder(tmp_path, n=6, labels=None):
  src = tmp_path / "src"
  src.mkdir()
  for i in range(n):
    write_nifti(src / f"p{i}.nii.gz", ct_volume(i, (4, 16, 16)))
  if labels is not None:
    (tmp_path / "labels.csv").write_text(labels)
  return src


def _config(tmp_path, src, variant="quick", **loss):
  config = folder_gan.get_config(variant)
  config.data.source_dir, config.data.data_dir = str(src), str(tmp_path / "tfds")
  config.loss.update(loss)
  return config


@pytest.fixture
def no_build(monkeypatch):
  """Fails the test if anything tries to build a dataset."""
  def refuse(*args, **kwargs):
    raise AssertionError("a dataset build started before the config was rejected")
  monkeypatch.setattr(builders, "build", refuse)


def test_source_dir_is_the_only_required_setting(tmp_path, no_build):
  with pytest.raises(ValueError, match=r"source_dir None is not a directory.*"
                                       r"--config.data.source_dir=DIR"):
    validate_config(folder_gan.get_config("quick"), 1)
  for variant in ("quick", "quick,3d", None, "3d"):
    config = _config(tmp_path, _folder(tmp_path) if variant == "quick" else tmp_path / "src",
                     variant)
    validate_config(config, 1)  # unlabelled: the teacher switches itself off
    assert config.data.name == "medical_folder"
  config = folder_gan.get_config("quick,3d")
  assert (config.data.mode, config.data.depth, config.data.image_size) == ("3d", 8, 16)
  assert folder_gan.get_config("quick").data.image_size == 16


def test_teacher_is_on_with_conditions_and_off_without(tmp_path):
  config = folder_gan.get_config("quick")
  assert config.loss.teacher_weight is None  # auto
  assert loop.teacher_weight(config, ()) == 0.0
  assert loop.teacher_weight(config, ("dx",)) == 1.0
  assert loop.teacher_weight(config, None) == 1.0  # known only after the build
  config.loss.teacher_weight = 0.5
  assert loop.teacher_weight(config, ("dx",)) == 0.5


@pytest.mark.parametrize("loss, match", [
    (dict(teacher_weight=1.0), r"^loss.teacher_weight 1.0 needs conditions to teach, but the "
                               r"dataset has no conditions: data.labels_csv is not set .*"
                               r"set --config.loss.teacher_weight=0$"),
    (dict(condition_weight=0.5), r"^loss.condition_weight 0.5 .* data.labels_csv is not set"
                                 r".*--config.loss.condition_weight=0 "
                                 r"--config.model.d_condition_heads=False$"),
])
def test_settings_needing_conditions_fail_before_any_build(tmp_path, no_build, loss, match):
  config = _config(tmp_path, _folder(tmp_path), **loss)
  if "condition_weight" in loss:
    config.model.d_condition_heads = True
  with pytest.raises(ValueError, match=match):
    validate_config(config, 1)
  with pytest.raises(ValueError, match=match):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "tfds").exists() and not (tmp_path / "run").exists()


def test_teacher_fields_must_name_csv_columns(tmp_path, no_build):
  src = _folder(tmp_path, labels="subject,Age,dx\np0,40,a\np1,50,b\n")
  config = _config(tmp_path, src)
  config.teacher.fields = "lesion"
  config.data.labels_csv = str(tmp_path / "labels.csv")
  with pytest.raises(ValueError, match=r"teacher.fields names \['lesion'\], which are not "
                                       r"conditions of the dataset \(it has \['age', 'dx'\]\)"):
    validate_config(config, 1)
  config.teacher.fields = "dx"
  validate_config(config, 1)
  # A CSV with the subject column only: no conditions, said as such.
  (tmp_path / "labels.csv").write_text("subject\np0\n")
  config.loss.teacher_weight = 1.0
  with pytest.raises(ValueError, match=r"labels CSV .* has only the subject column 'subject'"):
    validate_config(config, 1)


def test_condition_names_come_from_the_csv_header_only(tmp_path, no_build):
  src = _folder(tmp_path, labels="subject,Age,Site ID\np0,40,a\n")
  config = _config(tmp_path, src)
  config.data.labels_csv = str(tmp_path / "labels.csv")
  with pytest.raises(ValueError, match=r"column 'Site ID' cannot be a condition name"):
    data.condition_names(config.data)
  (tmp_path / "labels.csv").write_text("subject,Age,dx\np0,40,a\n")
  assert data.condition_names(config.data) == ("age", "dx")
  config.data.labels_csv = None
  assert data.condition_names(config.data) == ()


def test_intensity_distance_is_in_the_policy_units_over_the_foreground():
  rng = np.random.default_rng(0)
  real = np.full((20, 8, 8), -1.0, np.float32)            # background...
  real[:, 2:6, 2:6] = rng.uniform(-0.5, 0.5, (20, 4, 4))  # ...and a foreground square
  shifted = np.where(real > -1, real + 0.2, real)         # same anatomy, brighter by 0.2
  mri = IntensityTransform("t1", "normalised", 0.0, 1.0)  # [-1, 1] <-> [0, 1]
  out = physical.intensity_distance(real, shifted, mri)
  # A shift of 0.2 in model units is 0.1 normalised units; background excluded.
  np.testing.assert_allclose(out["intensity_w1"], 0.1, rtol=1e-5)
  assert out["intensity_foreground_diff"] == 0.0
  suv = IntensityTransform("pet", "SUV", 0.0, 10.0)
  np.testing.assert_allclose(physical.intensity_distance(real, shifted, suv)["intensity_w1"],
                             1.0, rtol=1e-5)
  assert physical.intensity_distance(real, real, mri)["intensity_w1"] == 0.0
  more = real.copy()
  more[:, 6, 2:6] = 0.0                                    # 4 more foreground voxels of 64
  assert physical.intensity_distance(real, more, mri)["intensity_foreground_diff"] == 4 / 64


@pytest.mark.slow  # compiles the quick generator and trains the extractor (~1-2 min)
def test_evaluation_without_labels_reports_every_label_free_metric(tmp_path):
  src = _folder(tmp_path, n=12)
  config = _config(tmp_path, src)
  config.data.split_fractions = (0.5, 0.0, 0.5)
  config.eval.update(num_samples=12, prdc_k=3, kid_subset_size=8, figures=True)
  info = data.load_info(config.data)
  assert info.conditions == ()
  write_checkpoint(config, str(tmp_path / "run"))
  metrics = evaluate.evaluate(config, str(tmp_path / "run"))
  for key in ("fd_domain", "kid_domain", "precision", "recall", "density", "coverage",
              "hu_w1", "memorized_fraction", "memorized_fraction_pixel"):
    assert np.isfinite(metrics[key]) and np.isfinite(metrics[f"{key}_real_reference"]), key
  assert 0.0 <= metrics["extractor_pretext_accuracy_test"] <= 1.0
  assert not [k for k in metrics if k.endswith(("_accuracy", "_mae"))]  # no fidelity
  assert not [k for k in metrics if k.startswith("figure_samples_")]    # no per-class grid
  assert metrics["num_samples"] == 12
  with open(os.path.join(tmp_path, "run", "eval", "metrics.json")) as f:
    assert json.load(f)["fd_domain"] == metrics["fd_domain"]
  model, _, meta = classifier.training.load_extractor(metrics["extractor_path"])
  assert classifier.is_pretext(model) and meta["key"]["objective"] == "rotation_pretext"
