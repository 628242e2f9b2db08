"""Precisions of the generator: bytes actually stored, and fidelity vs fp32.

A random-weight generator stands in for a trained one (weights ~ N(0, 0.1),
condition gates included, so every branch is active).
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from configs import phantom_gan
from conftest import random_generator_params, write_checkpoint
from medgen_jax import data as data_lib
from medgen_jax import models
from medgen_jax.studies import precision
from medgen_jax.inference import quantize, sample

B = 4


@pytest.fixture(scope="module")
def setup():
  config = phantom_gan.get_config("quick")
  info = data_lib.load_info(config.data)
  g = models.build_generator(config.model, info)
  latent = config.model.latent_dim
  params = random_generator_params(g, info, latent, B)
  z = sample.make_noise(0, B, latent)
  cond = sample.build_conditions({}, info, B, seed=0)
  prep = lambda p, **kw: quantize.prepare_for_sampling(g, params, p, info=info, batch_size=B,
                                                       latent_dim=latent, **kw)
  run = lambda prepared: sample.generate(prepared, z, cond, batch_size=B)[0]
  return dict(config=config, info=info, params=params, prep=prep, run=run,
              fp32=run(prep("fp32")), int8=prep("int8"))


def test_int8_bytes(setup):
  int8 = setup["int8"]
  fp32_bytes = sum(x.size * 4 for x in jax.tree.leaves(setup["params"]))
  assert quantize.param_bytes(setup["params"]) == fp32_bytes
  # Independent count of what is stored: int8 values 1 byte, float scales and
  # the small float params left unquantized 4 bytes.
  leaves = jax.tree.leaves(quantize._unwrap(int8.params), is_leaf=lambda x: isinstance(x, qwix.QArray))
  count, int8_values = 0, 0
  for leaf in leaves:
    if isinstance(leaf, qwix.QArray):
      assert leaf.qvalue.dtype == jnp.int8
      int8_values += leaf.qvalue.size
      count += leaf.qvalue.size + 4 * leaf.scale.size
    else:
      assert leaf.dtype == jnp.float32
      count += 4 * leaf.size
  sizes = quantize.stored_bytes(int8)
  assert sizes["param_bytes"] == count
  assert int8_values > 0.9 * fp32_bytes / 4  # nearly every weight is int8
  assert sizes["param_bytes"] <= 0.30 * fp32_bytes
  assert sizes["quantized_bytes"] <= 0.30 * sizes["quantized_fp32_bytes"]


def test_int8_close_and_broken_quantization_visible(setup):
  p8 = quantize.psnr(setup["run"](setup["int8"]), setup["fp32"])
  p2 = quantize.psnr(setup["run"](setup["prep"]("int2")), setup["fp32"])
  assert math.isfinite(p8) and p8 > 30.0, p8
  assert p2 < p8 - 10.0, (p2, p8)


def test_psnr_reference():
  x = np.zeros((2, 4, 4, 1))
  y = x + 0.1
  assert quantize.psnr(y, x) == pytest.approx(10 * math.log10(4 / 0.01))
  assert quantize.psnr(x, x) == float("inf")


def test_bf16(setup):
  bf16 = setup["prep"]("bf16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16.params))
  assert quantize.param_bytes(bf16.params) * 2 == quantize.param_bytes(setup["params"])
  out = setup["run"](bf16)
  assert out.dtype == np.float32
  assert 25.0 < quantize.psnr(out, setup["fp32"]) < float("inf")


@pytest.mark.slow
def test_static_int8_activations(setup):
  with pytest.raises(ValueError, match="calibration"):
    quantize.prepare(None, setup["params"], "int8", example_z=None, example_conditions=None,
                     activations=True)
  a8 = setup["prep"]("int8", calibration_batches=2)
  assert a8.precision == "int8_a8"
  # Static scales are stored parameters (named *_scale by qwix).
  names = [jax.tree_util.keystr(k) for k, _ in
           jax.tree_util.tree_flatten_with_path(a8.params)[0]]
  assert any("_lhs_scale" in n for n in names)
  p = quantize.psnr(setup["run"](a8), setup["fp32"])
  assert math.isfinite(p) and p > 20.0, p


@pytest.mark.slow
def test_compare_precisions_table(tmp_path):
  config = phantom_gan.get_config("quick")
  workdir = str(tmp_path / "run")
  write_checkpoint(config, workdir)
  out = str(tmp_path / "table")
  rows = precision.compare_precisions(
      config, workdir, out, num_samples=6, batch_size=6, precisions=("fp32", "int8", "int2"),
      extractor_settings=dict(extractor_steps=2, extractor_batch_size=4,
                              extractor_widths=(4, 8), extractor_feature_dim=4,
                              extractor_path=str(tmp_path / "extractor")))
  with open(os.path.join(out, "precision_table.json")) as f:
    assert json.load(f) == json.loads(json.dumps(rows))
  by = {r["precision"]: r for r in rows}
  for r in rows:
    for key in ("precision", "param_bytes", "ms_per_image", "psnr_vs_fp32", "fd_domain",
                "lesion_accuracy"):
      assert key in r
    assert r["ms_per_image"] > 0 and math.isfinite(r["fd_domain"])
    assert 0.0 <= r["lesion_accuracy"] <= 1.0
  assert by["fp32"]["psnr_vs_fp32"] is None  # the reference itself
  assert by["int8"]["param_bytes"] <= 0.30 * by["fp32"]["param_bytes"]
  assert by["int2"]["psnr_vs_fp32"] < by["int8"]["psnr_vs_fp32"] - 10.0
  table = open(os.path.join(out, "precision_table.md")).read()
  assert table.count("\n") == 2 + len(rows) and "| int8 |" in table
