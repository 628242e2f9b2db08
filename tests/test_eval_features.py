"""Domain feature extractor: learns a blob-encoded class, orbax roundtrip."""
import numpy as np
import pytest

from medgen_jax import classifier
from medgen_jax.classifier import training as features
from medgen_jax.data.info import ConditionField
from medgen_jax.models.layers import space_to_depth

FIELDS = (ConditionField("lesion", "categorical", num_classes=2),
          ConditionField("age", "continuous", value_range=(20.0, 90.0)))


def _blobs(rng, n, size=16):
  """Class 0: dark blob, class 1: bright blob, at random places; age sets
  the background level linearly."""
  yy, xx = np.mgrid[:size, :size]
  labels = rng.integers(0, 2, n)
  age = rng.uniform(20, 90, n).astype(np.float32)
  imgs = np.empty((n, size, size, 1), np.float32)
  for i in range(n):
    cy, cx = rng.integers(4, size - 4, 2)
    img = (age[i] - 55) / 100 + rng.normal(0, 0.1, (size, size))
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 10] = 1.0 if labels[i] else -1.0
    imgs[i, ..., 0] = np.clip(img, -1, 1)
  return imgs, {"lesion": labels.astype(np.int32), "age": age}


@pytest.fixture(scope="module")
def trained():
  rng = np.random.default_rng(0)
  imgs, cond = _blobs(rng, 256)
  cond["lesion"][:8] = -1          # unknowns must be ignored, not crash
  cond["age"][8:16] = np.nan
  model, params, history = features.train_feature_extractor(
      imgs, cond, FIELDS, steps=150, batch_size=32, seed=0, lr=1e-2,
      widths=(8, 16), feature_dim=16)
  return model, params, history


def test_learns_blob_class_and_age(trained):
  model, params, history = trained
  assert all(np.isfinite(h["loss"]) for h in history)
  imgs, cond = _blobs(np.random.default_rng(1), 128)
  pred = features.predict_conditions(model, params, imgs, batch_size=50)
  assert pred["lesion"].dtype == np.int32
  assert np.mean(pred["lesion"] == cond["lesion"]) > 0.9
  # Age is read from the background level: clearly better than the mean guess.
  mae = np.mean(np.abs(pred["age"] - cond["age"]))
  assert mae < 0.6 * np.mean(np.abs(cond["age"] - cond["age"].mean()))


def test_features_batch_invariant_and_orbax_roundtrip(trained, tmp_path):
  model, params, _ = trained
  imgs, _ = _blobs(np.random.default_rng(2), 10)
  f1 = features.extract_features(model, params, imgs, batch_size=4)
  f2 = features.extract_features(model, params, imgs, batch_size=10)
  assert f1.shape == (10, 16)
  np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-6)
  path = features.save_extractor(tmp_path / "extractor", model, params,
                                 input_shape=imgs.shape[1:],
                                 metadata={"dataset": "blobs"})
  model2, params2, meta = features.load_extractor(path)
  assert model2 == model and meta == {"dataset": "blobs"}
  np.testing.assert_array_equal(
      features.extract_features(model2, params2, imgs, batch_size=4), f1)


def test_3d_input_and_validation():
  rng = np.random.default_rng(3)
  vols = rng.uniform(-1, 1, (3, 8, 8, 8, 1)).astype(np.float32)
  model, params = features.init_extractor(FIELDS, vols.shape[1:], seed=0,
                                          widths=(4,), feature_dim=8)
  feats = features.extract_features(model, params, vols, batch_size=2)
  assert feats.shape == (3, 8) and np.all(np.isfinite(feats))
  # 3D convolutions: each volume's features depend on that volume only.
  np.testing.assert_allclose(
      features.extract_features(model, params, vols[1:2]), feats[1:2],
      rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="lack field 'age'"):
    features.train_feature_extractor(vols, {"lesion": np.zeros(3)}, FIELDS,
                                     steps=1, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="training rank"):
    features.extract_features(model, params, vols[0])
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    features.extract_features(model, params, vols[0, 0, 0])


@pytest.mark.parametrize("spatial", [(4, 6), (2, 4, 6)])
def test_space_to_depth_moves_every_voxel_into_channels(spatial):
  x = np.random.default_rng(4).normal(size=(2, *spatial, 3)).astype(np.float32)
  y = np.asarray(space_to_depth(x, 2))
  nd = len(spatial)
  assert y.shape == (2, *(s // 2 for s in spatial), 3 * 2 ** nd)
  # Brute force: output channel (offset index) * C + c holds voxel
  # 2 * coarse + offset, offsets in row-major order.
  for coarse in np.ndindex(*y.shape[1:-1]):
    for k, offset in enumerate(np.ndindex(*(2,) * nd)):
      fine = tuple(2 * a + o for a, o in zip(coarse, offset))
      np.testing.assert_array_equal(y[(slice(None), *coarse, slice(3 * k, 3 * k + 3))],
                                    x[(slice(None), *fine, slice(None))])
  with pytest.raises(ValueError, match="not divisible by 4"):
    space_to_depth(x, 4)


def test_patch_stem_and_max_pooling_learn_and_roundtrip(tmp_path):
  # The evaluation's default architecture (space-to-depth stem, mean + max
  # pooling) learns the blob class too, and its settings survive save/load.
  imgs, cond = _blobs(np.random.default_rng(5), 256)
  model, params, _ = features.train_feature_extractor(
      imgs, {"lesion": cond["lesion"]}, FIELDS[:1], steps=150, batch_size=32,
      seed=0, lr=1e-2, widths=(8, 16), feature_dim=16, stem_patch=2,
      pooling="mean_max")
  test_imgs, test_cond = _blobs(np.random.default_rng(6), 128)
  pred = features.predict_conditions(model, params, test_imgs)["lesion"]
  assert np.mean(pred == test_cond["lesion"]) > 0.9
  path = features.save_extractor(tmp_path / "x", model, params, input_shape=(16, 16, 1))
  model2, params2, _ = features.load_extractor(path)
  assert (model2.stem_patch, model2.pooling) == (2, "mean_max")
  np.testing.assert_array_equal(
      features.predict_conditions(model2, params2, test_imgs)["lesion"], pred)
  with pytest.raises(ValueError, match=r"expects \[N, \.\.\., \.\.\., 1\] images"):
    features.extract_features(model, params, np.zeros((2, 16, 16, 4), np.float32))


@pytest.mark.parametrize("arch, message", [
    (dict(pooling="attention"), "pooling must be one of"),
    (dict(stem_patch=0), "stem_patch must be >= 1"),
    (dict(widths=()), "widths and feature_dim must be positive"),
])
def test_bad_architecture_is_one_clear_error(arch, message):
  with pytest.raises(ValueError, match=message):
    features.make_extractor(FIELDS, **arch)
  with pytest.raises(ValueError, match=message):  # a recipe fails when it is read
    classifier.Recipe(**arch)


def test_recipe_reads_its_section_and_back():
  recipe = classifier.Recipe(steps=7, widths=[8, 16], fields=" lesion, site ", seed=3)
  assert recipe.widths == (8, 16) and recipe.fields == ("lesion", "site")
  values = classifier.section_values(recipe)
  assert values["fields"] == "lesion,site"
  assert classifier.from_section(values) == recipe
  # A prefixed section (config.eval) with an unprefixed max_train; other keys ignored.
  section = {f"extractor_{k}": v for k, v in values.items()}
  section.update(max_train=12, extractor_max_train=99, kid_subsets=3)
  got = classifier.from_section(section, prefix="extractor_", unprefixed=("max_train",))
  assert got == classifier.Recipe(steps=7, widths=(8, 16), fields="lesion,site", seed=3,
                                  max_train=12)
  assert classifier.from_section({}) == classifier.Recipe()
  with pytest.raises(ValueError, match="unknown classifier recipe fields"):
    classifier.section_values(candidates=4)
  with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
    classifier.Recipe(steps=0)


@pytest.mark.slow  # a subprocess on 8 simulated devices trains and saves (~15 s)
def test_extractor_saved_on_another_device_topology_restores_here(tmp_path):
  # An extractor cached on an accelerator host must load on a CPU-only one.
  # Simulated: saved from a 2-device process with its params on device 1,
  # restored in this (1-device) process.
  import os
  import subprocess
  import sys
  import textwrap
  script = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp
    from medgen_jax.data.info import ConditionField
    from medgen_jax.classifier import training as features
    model = features.make_extractor((ConditionField("lesion", "categorical", 2),),
                                    widths=(4,), feature_dim=4)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    params = jax.device_put(params, jax.devices()[1])
    features.save_extractor(sys.argv[1], model, params, input_shape=(8, 8, 1))
    print(float(jnp.sum(params["features"]["kernel"])))
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x")], cwd=root,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  _, params, _ = features.load_extractor(tmp_path / "x")
  np.testing.assert_allclose(float(np.sum(params["features"]["kernel"])),
                             float(out.stdout.strip().splitlines()[-1]), rtol=1e-6)
