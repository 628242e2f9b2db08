"""Sampling end to end from a checkpoint in the training loop's layout.

The `quick_checkpoint` fixture (conftest.py) writes a checkpoint with the
training code's own pieces (`state.make_init_fn` shapes, `checkpoint.save`):
compiling a real train step takes minutes on the shared 2-core CPU, so the
params are random rather than trained (a slow test runs `train_and_evaluate` itself). Sampling never sees
the difference: it restores the EMA generator from the same layout.
"""
import json
import os

import jax
import nibabel as nib
import numpy as np
import pytest

from configs import phantom_gan
# Re-exported: other test modules import write_checkpoint from here.
from conftest import write_checkpoint  # noqa: F401
from medgen_jax import data as data_lib
from medgen_jax.inference import quantize, sample


def test_restore_reads_ema_params(quick_checkpoint):
  config, workdir, state = quick_checkpoint
  info = data_lib.load_info(config.data)
  _, params, step = sample.restore_ema_generator(config, workdir, info)
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, params, state.ema_params)


def test_sample_fp32_and_int8(quick_checkpoint, tmp_path):
  config, workdir, _ = quick_checkpoint
  info = data_lib.load_info(config.data)
  outs = {}
  for precision in ("fp32", "int8"):
    out = str(tmp_path / precision)
    s = sample.sample(config, workdir, num_samples=5, out_dir=out, batch_size=4,
                      condition="lesion=large,age=70", precision=precision, seed=1)
    assert s["checkpoint_step"] == 3 and s["precision"] == precision
    assert s["conditions"]["lesion"] == [2] * 5 and s["conditions"]["age"] == [70.0] * 5
    # site was not given: drawn uniformly, so valid classes.
    assert all(0 <= v < 4 for v in s["conditions"]["site"])
    assert s["latency"]["compile_s"] > 0 and s["latency"]["ms_per_image"] > 0
    assert s["latency"]["num_batches"] == 2  # 4 + 1 padded
    with open(os.path.join(out, "samples.json")) as f:
      assert json.load(f)["seed"] == 1
    assert os.path.getsize(os.path.join(out, "grid.png")) > 0
    vols = []
    for name in s["files"]:
      img = nib.load(os.path.join(out, name))
      assert img.shape == info.spatial_shape
      np.testing.assert_allclose(img.header.get_zooms()[:2], info.spacing_mm, rtol=1e-6)
      np.testing.assert_allclose(np.diag(img.affine)[:2], info.spacing_mm, rtol=1e-6)
      vols.append(np.asarray(img.dataobj))
    vols = np.stack(vols)
    lo, hi = info.intensity[0].lo, info.intensity[0].hi
    assert vols.min() >= lo - 1e-3 and vols.max() <= hi + 1e-3
    assert vols.std() > 1.0  # HU, not model range
    outs[precision] = info.to_model(vols[..., None])
  # Same noise and conditions: int8 close to fp32 but not identical.
  p = quantize.psnr(outs["int8"], outs["fp32"])
  assert 25.0 < p < float("inf")


@pytest.mark.parametrize("text, words", [
    ("tumour=large", ["no condition", "tumour"]),
    ("lesion=huge", ["unknown class", "huge"]),
    ("age=150", ["age", "outside"]),
    ("lesion", ["name=value"]),
    ("site=1,site=2", ["twice"]),
])
def test_bad_condition_is_one_clear_error(quick_checkpoint, tmp_path, text, words):
  config, workdir, _ = quick_checkpoint
  with pytest.raises(ValueError) as e:
    # A missing workdir would be a different error: conditions are checked first.
    sample.sample(config, str(tmp_path / "nowhere"), num_samples=2, out_dir=str(tmp_path),
                  condition=text)
  for w in words:
    assert w in str(e.value)


def test_unknown_fields_mode():
  info = data_lib.load_info(phantom_gan.get_config("quick").data)
  c = sample.build_conditions({"age": 40.0}, info, 3, seed=0, unspecified="unknown")
  np.testing.assert_array_equal(c["lesion"], [-1, -1, -1])
  np.testing.assert_array_equal(c["age"], [40.0] * 3)
  assert c["lesion"].dtype == np.int32 and c["age"].dtype == np.float32


def test_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first"):
    info = data_lib.load_info(phantom_gan.get_config("quick").data)
    sample.restore_ema_generator(phantom_gan.get_config("quick"), str(tmp_path), info)


@pytest.mark.slow  # minutes on a shared 2-core CPU: compiles a real train step
def test_after_real_training(tmp_path):
  from medgen_jax.train import train_and_evaluate
  config = phantom_gan.get_config("quick")
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  s = sample.sample(config, workdir, num_samples=2, out_dir=str(tmp_path / "s"),
                    precision="int8", batch_size=2)
  assert s["checkpoint_step"] == config.train.num_steps
  generate, step = sample.generator_fn(config, workdir, data_lib.load_info(config.data),
                                       batch_size=2)
  images = generate({"lesion": np.array([0, 2], np.int32),
                     "age": np.array([30.0, np.nan], np.float32),
                     "site": np.array([-1, 1], np.int32)}, 0)
  assert step == config.train.num_steps and images.shape == (2, 32, 32, 1)
  assert np.all(np.abs(images) <= 1.0)
