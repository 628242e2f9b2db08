"""The label-free domain extractor (rotation pretext) and its cache."""
import json
import os

import numpy as np
import pytest

from configs import data_folder
from conftest import ct_volume, write_nifti
from medgen_jax import data
from medgen_jax.metrics import distances
from medgen_jax import classifier
from medgen_jax.classifier import training

SMALL = dict(widths=(8, 16), feature_dim=16, stem_patch=1, pooling="mean_max")


def test_rotate_in_plane_matches_index_formula():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 5, 5, 2))
  turns = np.array([0, 1, 2, 3])
  out = training.rotate_in_plane(images, turns)
  n = 5
  for i in range(n):
    for j in range(n):
      # A quarter turn counter-clockwise: out[i, j] = in[j, n - 1 - i].
      np.testing.assert_array_equal(out[1, i, j], images[1, j, n - 1 - i])
      np.testing.assert_array_equal(out[2, i, j], images[2, n - 1 - i, n - 1 - j])
      np.testing.assert_array_equal(out[3, i, j], images[3, n - 1 - j, i])
  np.testing.assert_array_equal(out[0], images[0])
  volumes = rng.normal(size=(2, 3, 5, 5, 1))
  turned = training.rotate_in_plane(volumes, np.array([1, 1]))
  for d in range(3):  # volumes turn about their depth axis, slice by slice
    np.testing.assert_array_equal(turned[:, d], training.rotate_in_plane(volumes[:, d], [1, 1]))
  with pytest.raises(ValueError, match="square"):
    training.rotate_in_plane(np.zeros((1, 4, 6, 1)), [1])


def _scans(n, seed):
  """Body-like 16x16 slices: a body disc, a bright spine at the back, noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:16, :16]
  out = []
  for _ in range(n):
    cy, cx, r = 7.5 + rng.normal(0, 0.7), 7.5 + rng.normal(0, 0.7), rng.uniform(5, 7)
    img = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, 0.0, -1.0)
    img[int(cy + r * 0.6):int(cy + r * 0.6) + 2, int(cx) - 1:int(cx) + 2] = 0.9
    out.append(img + rng.normal(0, 0.1, img.shape))
  return np.clip(np.asarray(out, np.float32)[..., None], -1, 1)


@pytest.mark.slow  # 60 training steps: ~30 s on the shared CPU
def test_pretext_extractor_learns_orientation_without_labels():
  train, test = _scans(64, 0), _scans(32, 1)
  model, params, history = training.train_pretext_extractor(
      train, steps=60, batch_size=16, seed=0, lr=3e-3, **SMALL)
  assert classifier.is_pretext(model) and len(history) == 60
  acc = classifier.pretext_accuracy(model, params, test)
  assert acc > 0.8, acc  # chance is 0.25
  # Features: held-out scans sit with the train scans; scans turned upside
  # down (an anatomy the data never has) do not.
  f_train = classifier.extract_features(model, params, train)
  real = distances.frechet_distance(f_train, classifier.extract_features(model, params, test))
  flipped = distances.frechet_distance(
      f_train, classifier.extract_features(model, params, test[:, ::-1]))
  assert flipped > 5 * real, (real, flipped)


def test_unlabelled_dataset_gets_a_cached_pretext_extractor(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for i in range(4):
    write_nifti(src / f"s{i}.nii.gz", ct_volume(i, (4, 16, 16)))
  config = data_folder.get_config("quick")
  config.source_dir, config.data_dir = str(src), str(tmp_path / "tfds")
  config.split_fractions, config.foreground_only = (1.0, 0.0, 0.0), False
  info = data.load_info(config)
  train = data.load_arrays(config, split="train")
  recipe = classifier.Recipe(steps=3, batch_size=4, widths=(8,), feature_dim=8)
  path = classifier.cache_path(config, info, recipe)
  # What a process killed while saving leaves: a directory without extractor.json.
  os.makedirs(os.path.join(path, "params"))
  model, _, meta = classifier.get_classifier(recipe, config, info, train=train)
  assert classifier.is_pretext(model) and not meta["reused"]
  assert meta["key"]["objective"] == "rotation_pretext"
  assert sorted(os.listdir(os.path.dirname(path))) == [os.path.basename(path)]  # no partials
  with open(os.path.join(path, "extractor.json")) as f:
    assert json.load(f)["fields"][0]["name"] == "pretext_rotation"
  again, _, meta = classifier.get_classifier(recipe, config, info, train=train)
  assert meta["reused"] and classifier.is_pretext(again)
