"""3D config defaults, volume figures (orthogonal slices + MIP), step memory."""
import os

import jax
import numpy as np
import pytest

from configs import phantom_3d
from medgen_jax.data.info import ConditionField, DatasetInfo, IntensityTransform
from medgen_jax.models import build_generator
from medgen_jax.models import shapes
from medgen_jax.viz_volume import orthogonal_views, save_volume_figure


def _info(spatial):
  return DatasetInfo(
      name="toy", image_shape=(*spatial, 1), modalities=("ct",),
      intensity=(IntensityTransform("ct", "HU", -1000.0, 1000.0),),
      conditions=(ConditionField("lesion", "categorical", num_classes=3),),
      spacing_mm=(2.0, 1.0, 1.0))


def test_3d_config_defaults_to_axial_cpu_size_and_full_is_32x64x64():
  config = phantom_3d.get_config()
  assert config.data.mode == "3d"
  assert (config.data.depth, config.data.image_size) == (16, 32)
  assert config.model.attention == "axial"
  grid, num_up = shapes.upsampling_plan((16, 32, 32), config.model.token_grid)
  assert grid == (4, 8, 8) and num_up == 2
  full = phantom_3d.get_config("full")
  assert (full.data.depth, full.data.image_size) == (32, 64)
  assert full.model.attention == "axial" and full.model.variant == "S"
  grid, num_up = shapes.upsampling_plan((32, 64, 64), full.model.token_grid)
  # Stage 1 has 8x16x16 = 2048 tokens: full attention's 2048^2 logits per
  # head and example is what the axial default avoids.
  assert grid == (4, 8, 8) and num_up == 3
  # Every variant builds (sizes are valid) at both sizes.
  for attention in ("full", "axial", "window", "window_shifted"):
    for size, spatial in (("", (16, 32, 32)), (",full", (32, 64, 64))):
      cfg = phantom_3d.get_config(f"attention={attention}{size}")
      assert cfg.model.attention == attention
      build_generator(cfg.model, _info(spatial))
  quick = phantom_3d.get_config("quick")
  assert (quick.data.depth, quick.data.image_size) == (8, 16)
  build_generator(quick.model, _info((8, 16, 16)))
  with pytest.raises(ValueError, match="unknown variant"):
    phantom_3d.get_config("pet")
  with pytest.raises(ValueError, match="two sizes"):
    phantom_3d.get_config("quick,full")


def test_orthogonal_views_and_mip_by_index():
  vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
  v = orthogonal_views(vol)
  np.testing.assert_array_equal(v["axial"], vol[2])
  np.testing.assert_array_equal(v["coronal"], vol[:, 2, :])
  np.testing.assert_array_equal(v["sagittal"], vol[:, :, 3])
  # arange grows along H, so the MIP over H is the last row, h = 4.
  np.testing.assert_array_equal(v["mip"], vol[:, 4, :])
  hot = np.zeros((4, 5, 6))
  hot[1, 3, 2] = 7.0                      # a hot spot off every central slice
  assert orthogonal_views(hot)["mip"][1, 2] == 7.0
  assert orthogonal_views(hot)["axial"].max() == 0.0
  with pytest.raises(ValueError, match=r"\[D, H, W\]"):
    orthogonal_views(vol[0])


def test_save_volume_figure_writes_png(tmp_path):
  rng = np.random.default_rng(0)
  real = rng.uniform(-1, 1, (2, 8, 16, 16, 1)).astype(np.float32)
  path = str(tmp_path / "vol.png")
  save_volume_figure(real, real[:1], _info((8, 16, 16)), path)
  assert os.path.getsize(path) > 1000
  with pytest.raises(ValueError, match="channel"):
    save_volume_figure(real, real, _info((8, 16, 16)), path, channel=1)
  with pytest.raises(ValueError, match="generated"):
    save_volume_figure(real, real[:, 0], _info((8, 16, 16)), path)


@pytest.mark.slow
def test_step_memory_counts_the_state_and_batch_as_arguments():
  from medgen_jax.bench import step_memory  # pylint: disable=import-outside-toplevel
  from medgen_jax import models as models_lib  # pylint: disable=import-outside-toplevel
  from medgen_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  config = phantom_3d.get_config("quick")
  config.model.spectral_norm = False
  info = _info((8, 16, 16))
  m = step_memory.step_memory(config, info)
  models = state_lib.make_models(models_lib.build_generator(config.model, info),
                                 models_lib.build_discriminator(config.model, info),
                                 config)
  state = jax.eval_shape(state_lib.make_init_fn(
      models, info, latent_dim=config.model.latent_dim, seed=0))
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  b = config.train.batch_size
  nbytes += b * 8 * 16 * 16 * 4 + b * 4          # image float32 + lesion int32
  assert m["argument_bytes"] == nbytes
  # (XLA:CPU's peak_bytes leaves the temporaries out, so only temp is checked.)
  assert m["temp_bytes"] > 0
