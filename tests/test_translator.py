"""Cross-modal translator: a missing source is masked exactly, never zero-filled."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medgen_jax.data.info import ConditionField, DatasetInfo, IntensityTransform
from medgen_jax.models import build_generator
from medgen_jax.models.translator import (Translator, modality_dropout_mask,
                                          split_modalities)
from medgen_jax.models.unet import UNet

SHAPE = (16, 16)
CONDS = (ConditionField("lesion", "categorical", num_classes=3),)


@pytest.fixture(scope="module")
def translator():
  model = Translator(spatial_shape=SHAPE, source_modalities=("t1", "flair"),
                     num_target_channels=1, conditions=CONDS, width=16, depth=1,
                     num_heads=2, encoder_depth=1, patch_size=4,
                     attention="window", window_size=2, cond_dim=8,
                     modality_dropout=0.5, refine_width=4)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  sources = {"t1": jax.random.normal(k1, (2, *SHAPE, 1)),
             "flair": jax.random.normal(k2, (2, *SHAPE, 1))}
  cond = {"lesion": jnp.array([0, 2], jnp.int32)}
  params = jax.jit(lambda k: model.init({"params": k, "dropout": k}, sources, cond,
                                        train=False))(jax.random.PRNGKey(1))
  apply = jax.jit(lambda s, m: model.apply(params, s, cond, train=False,
                                           source_mask=m))
  return model, params, sources, cond, apply


def test_masked_source_equals_absent_source_and_differs_from_zero_fill(translator):
  _, _, sources, _, apply = translator
  both = np.ones((2, 2), bool)
  flair_masked = np.array([[True, False], [True, False]])
  masked = np.asarray(apply(sources, flair_masked))
  absent = np.asarray(apply({"t1": sources["t1"]}, both))
  zero = np.asarray(apply({"t1": sources["t1"],
                           "flair": jnp.zeros_like(sources["flair"])}, both))
  full = np.asarray(apply(sources, both))
  np.testing.assert_allclose(masked, absent, atol=1e-5)
  assert np.abs(masked - zero).max() > 1e-2
  assert np.abs(masked - full).max() > 1e-2
  # Per-example masks: example 0 loses FLAIR, example 1 keeps both.
  mixed = np.asarray(apply(sources, np.array([[True, False], [True, True]])))
  np.testing.assert_allclose(mixed[0], absent[0], atol=1e-5)
  np.testing.assert_allclose(mixed[1], full[1], atol=1e-5)
  assert mixed.shape == (2, *SHAPE, 1) and np.all(np.abs(mixed) <= 1)


def test_modality_dropout_is_active_only_in_training(translator):
  model, params, sources, cond, apply = translator
  run = jax.jit(lambda k: model.apply(params, sources, cond, train=True,
                                      rngs={"dropout": k}))
  outs = [np.asarray(run(jax.random.PRNGKey(i))) for i in range(6)]
  full = np.asarray(apply(sources, np.ones((2, 2), bool)))
  # Some draw drops a source for some example (p = 1 - (1/2)^... ~ 1).
  assert any(np.abs(o - full).max() > 1e-3 for o in outs)
  np.testing.assert_allclose(np.asarray(apply(sources, np.ones((2, 2), bool))), full)


def test_modality_dropout_mask_keeps_at_least_one_source():
  mask = np.asarray(modality_dropout_mask(jax.random.PRNGKey(0), 4000, 3, 0.5))
  assert mask.any(axis=1).all()
  # A source is kept if its own draw keeps it (1/2) or if all three were
  # dropped and the row is restored (1/8): 0.625.
  assert abs(mask.mean() - 0.625) < 0.025
  assert np.asarray(modality_dropout_mask(jax.random.PRNGKey(1), 8, 2, 0.0)).all()


def test_split_modalities_and_source_errors(translator):
  model, params, sources, cond, _ = translator
  images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  parts = split_modalities(images, ("ct", "pet", "mr"), ("mr", "ct"))
  np.testing.assert_array_equal(parts["mr"][..., 0], images[..., 2])
  np.testing.assert_array_equal(parts["ct"][..., 0], images[..., 0])
  with pytest.raises(ValueError, match="not in the data"):
    split_modalities(images, ("ct", "pet", "mr"), ("t2",))
  with pytest.raises(ValueError, match="subset"):
    model.apply(params, {"t2": sources["t1"]}, cond, train=False)
  with pytest.raises(ValueError, match="subset"):
    model.apply(params, {}, cond, train=False)


def _info(modalities=("ct", "pet")):
  return DatasetInfo(
      name="toy", image_shape=(*SHAPE, len(modalities)), modalities=modalities,
      intensity=tuple(IntensityTransform(m, "u", 0.0, 1.0) for m in modalities),
      conditions=CONDS)


def _model_config(**kw):
  cfg = ml_collections.ConfigDict(dict(
      generator="translator", variant="Ti", attention="window_shifted",
      window_size=2, patch_size=4, mlp_ratio=2, qk_norm=True, chunk_size=None,
      cond_dim=8, cond_dropout=0.0, dtype="float32", source_modalities=("ct",),
      target_modalities=("pet",), modality_dropout=0.0, encoder_depth=1, unet_width=4,
      unet_levels=2))
  cfg.update(kw)
  return cfg


@pytest.mark.parametrize("overrides, match", [
    (dict(patch_size=3), "patch_size"),
    (dict(window_size=8), "window_size"),
    (dict(target_modalities=("ct",)), "disjoint"),
    (dict(source_modalities=("mr",)), "modalities"),
    (dict(attention="nope"), "unknown attention"),
])
def test_build_translator_rejects_bad_configs(overrides, match):
  with pytest.raises(ValueError, match=match):
    build_generator(_model_config(**overrides), _info())


def test_registry_builds_both_translators():
  assert isinstance(build_generator(_model_config(), _info()), Translator)
  unet = build_generator(_model_config(generator="unet"), _info())
  assert isinstance(unet, UNet) and unet.levels == 2
  with pytest.raises(ValueError, match="unet_levels"):
    build_generator(_model_config(generator="unet", unet_levels=5), _info())


def test_unet_masked_source_is_zero_filled():
  """The CNN baseline cannot mask: masking means a zero image (by design)."""
  model = UNet(spatial_shape=SHAPE, source_modalities=("t1", "flair"),
               num_target_channels=1, conditions=CONDS, width=4, levels=2,
               cond_dim=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, *SHAPE, 1))
  cond = {"lesion": jnp.array([1, -1], jnp.int32)}
  params = jax.jit(lambda k: model.init(k, {"t1": x, "flair": x}, cond,
                                        train=False))(jax.random.PRNGKey(1))
  apply = jax.jit(lambda s, m: model.apply(params, s, cond, train=False,
                                           source_mask=m))
  masked = apply({"t1": x, "flair": x}, np.array([[True, False]] * 2))
  zero = apply({"t1": x, "flair": jnp.zeros_like(x)}, np.ones((2, 2), bool))
  full = apply({"t1": x, "flair": x}, np.ones((2, 2), bool))
  np.testing.assert_allclose(masked, zero, atol=1e-6)
  assert np.abs(np.asarray(masked - full)).max() > 1e-4
  assert masked.shape == (2, *SHAPE, 1)
