"""The attention benchmark runs end to end on its quick config and reports honestly."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import benchmark_attention as bench_config
from medgen_jax import attention
from medgen_jax.bench import attention_suite, timing, torch_swin


def test_xla_flops_of_matmul_is_exact():
  a = jnp.ones((64, 32))
  b = jnp.ones((32, 16))
  compiled, _ = timing.compile_fn(lambda x, y: x @ y, (a, b))
  assert timing.xla_flops(compiled) == pytest.approx(2 * 64 * 32 * 16)


@pytest.mark.parametrize("name", attention_suite.VARIANTS)
def test_variant_core_matches_library(name):
  # Every benchmarked core must compute the variant it is named after,
  # otherwise the timings compare the wrong things.
  grid = (8, 8)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(key, (1, *grid, 2, 8)) for key in keys)
  if name in ("cudnn", "pallas", "window_shifted_cudnn") and jax.default_backend() == "cpu":
    # Fused-kernel rows exist only where the backend has the kernel.
    with pytest.raises(ValueError, match="runs on"):
      attention_suite.variant_fn(name, grid, window_size=4, chunk_size=16)
    return
  core = attention_suite.variant_fn(name, grid, window_size=4, chunk_size=16)
  flat = lambda x: x.reshape(1, -1, 2, 8)
  if name in ("full", "full_chunked", "xla_baseline", "cudnn", "pallas"):
    ref = jax.nn.dot_product_attention(flat(q), flat(k), flat(v)).reshape(q.shape)
  elif name.startswith("axial"):
    # The model's axial layer sums the per-axis attentions.
    ref = (attention.axial_attention(q, k, v, axis=0)
           + attention.axial_attention(q, k, v, axis=1))
  else:
    ref = attention.window_attention(q, k, v, window_size=4,
                                     shift=2 if name.startswith("window_shifted") else 0)
  np.testing.assert_allclose(core(q, k, v), ref, atol=1e-5)


def test_quick_benchmark_writes_results(tmp_path):
  config = bench_config.get_config("quick")
  config.grids = ((8, 8),)
  results = attention_suite.run_benchmark(config, str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["complete"] is True
  assert saved["rows"] == json.loads(json.dumps(results["rows"]))
  assert {r["variant"] for r in saved["rows"]} == set(config.variants)
  for row in saved["rows"]:
    assert row["status"] == "ok", row
    assert row["tokens"] == math.prod(row["grid"]) == 64
    assert row["fwd_bwd_ms"] > 0 and row["peak_bytes"] > 0 and row["flops"] > 0
  by_name = {r["variant"]: r for r in saved["rows"]}
  # The blocked form's loops would hide FLOPs from XLA; it is credited with the
  # same math as the dense baseline.
  assert by_name["full_chunked"]["flops"] == pytest.approx(
      by_name["xla_baseline"]["flops"], rel=0.05)  # lowered vs compiled HLO
  assert saved["matmul_gflops_per_s"] > 0
  assert (tmp_path / "attention_scaling.png").stat().st_size > 0
  # The quick config skips the (minutes-long) GAN step compile; the Swin
  # block runs in JAX, and in torch only where the [bench] extra is installed.
  assert saved["train_step_mfu"] is None
  assert saved["swin_block_ms"] > 0
  peer = saved["torch_swin_block"]
  assert (peer["ms"] > 0) if saved["torch_swin_block_ms"] is not None else peer["reason"]


@pytest.mark.slow  # a second benchmark run; test_quick_benchmark_writes_results stays
def test_gpu_config_and_its_quick_cpu_analogue(tmp_path):
  gpu = bench_config.get_config("gpu")
  assert gpu.dtype == "bfloat16" and (gpu.num_heads, gpu.head_dim) == (8, 64)
  assert {"cudnn", "pallas"} | set(attention_suite.FORCED) <= set(gpu.variants)
  assert max(math.prod(g) for g in gpu.grids if len(g) == 2) == 65536
  assert (32, 32, 32) in [tuple(g) for g in gpu.grids]
  assert gpu.train_step.gan.model.dtype == "bfloat16"
  # The same rows on CPU at quick sizes: bf16 rows reported as a fraction of
  # a same-run bf16 matmul; the fused-kernel rows say why they did not run.
  config = bench_config.get_config("gpu,quick")
  config.grids = ((8, 8),)
  config.variants = ("full", "xla_baseline", "window", "window_xla", "cudnn", "pallas",
                     "window_shifted_cudnn")
  results = attention_suite.run_benchmark(config, str(tmp_path))
  assert results["matmul_dtype"] == "bfloat16"
  assert results["matmul_gflops_per_s_row_dtype"] > 0
  by_name = {r["variant"]: r for r in results["rows"]}
  for name in ("full", "xla_baseline", "window", "window_xla"):
    row = by_name[name]
    assert row["status"] == "ok", row
    assert row["fraction_of_matmul"] == pytest.approx(
        row["gflops_per_s"] / results["matmul_gflops_per_s_row_dtype"], rel=1e-2)
  # A forced kernel is credited with the FLOPs of the same math, whatever runs.
  assert by_name["window"]["flops"] == by_name["window_xla"]["flops"] > 0
  assert by_name["full"]["flops"] == by_name["xla_baseline"]["flops"] > 0
  for name in ("cudnn", "pallas", "window_shifted_cudnn"):
    assert by_name[name]["status"] == "unsupported"
    assert "runs on" in by_name[name]["reason"]


def test_torch_swin_without_torch_records_a_reason(monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name.split(".")[0] in ("torch", "timm"):
      raise ImportError(f"No module named {name!r}")
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, "__import__", no_torch)
  out = torch_swin.torch_swin_block_ms(dim=8, num_heads=2, window=2, shift=1, mlp_ratio=2,
                                       batch=1, grid=4, threads=1, warmup=0, repeats=1)
  assert out["ms"] is None and "torch" in out["reason"]


def test_peak_bytes_counts_temporaries():
  # Dense attention of 1024 tokens holds at least one [1, 1024, 1024] float32
  # score matrix (4 MiB) at once; the estimate must include it.
  q = jnp.ones((1, 1024, 1, 8))
  compiled, _ = timing.compile_fn(
      lambda q: jax.nn.dot_product_attention(q, q, q), (q,))
  assert timing.xla_peak_bytes(compiled) >= 1024 * 1024 * 4


def test_time_compiled_caps_repeats_of_slow_functions():
  compiled, _ = timing.compile_fn(lambda x: x + 1, (jnp.ones(3),))
  assert len(timing.time_compiled(compiled, (jnp.ones(3),), warmup=1, repeats=4)) == 4
  assert len(timing.time_compiled(compiled, (jnp.ones(3),), warmup=1, repeats=4,
                                  max_seconds=0.0)) == 1


def test_train_step_synthetic_batch_matches_phantom_info():
  from configs import phantom_gan
  from medgen_jax.bench import train_step
  config = phantom_gan.get_config("quick")
  info = train_step.phantom_info(config.data)
  batch = train_step.synthetic_batch(info, 3)
  assert batch["image"].shape == (3,) + tuple(info.image_shape)
  assert info.image_shape[-1] == len(config.data.modalities)
  assert float(batch["image"].min()) >= -1 and float(batch["image"].max()) <= 1
  assert set(batch) == {"image"} | {f.name for f in info.conditions}


def test_memory_budget_reports_out_of_memory_without_running(tmp_path):
  config = bench_config.get_config("quick")
  config.grids = ((16, 16),)
  config.variants = ("xla_baseline",)
  config.memory_budget_gb = 1e-6
  results = attention_suite.run_benchmark(config, str(tmp_path))
  (row,) = results["rows"]
  assert row["status"] == "out_of_memory" and "fwd_bwd_ms" not in row


def test_unknown_variant_is_a_clear_error(tmp_path):
  config = bench_config.get_config("quick")
  config.variants = ("full", "flash_magic")
  with pytest.raises(ValueError, match="flash_magic"):
    attention_suite.run_benchmark(config, str(tmp_path))


@pytest.mark.slow  # compiles the quick GAN step twice (~1-2 CPU-minutes)
def test_train_step_mfu_amortises_the_lazy_r1_period():
  from configs import phantom_gan
  from medgen_jax.bench import train_step
  config = phantom_gan.get_config("quick")  # r1_every=2: one R1 step per two
  out = train_step.measure_train_step(config, warmup=1, repeats=2, matmul_gflops_per_s=100.0)
  assert out["r1_every"] == 2
  want = 0.5 * out["step_ms_r1"] + 0.5 * out["step_ms_no_r1"]
  assert abs(out["step_ms"] - want) < 0.02
  # (step_ms is rounded to 0.01 ms, mfu computed before rounding.)
  assert out["flops"] > 0 and out["mfu"] > 0
  assert out["mfu"] == pytest.approx(
      out["flops"] / (out["step_ms"] * 1e-3) / 1e9 / 100.0, abs=1e-4)


def _largest_by_brute_force(bytes_at, budget, multiple, cap):
  fitting = [b for b in range(multiple, cap + 1, multiple) if bytes_at(b) <= budget]
  return max(fitting)


@pytest.mark.parametrize("bytes_at", [
    lambda b: 100 + 7 * b,                  # linear: the two-point line is exact
    lambda b: 100 + 7 * b + 0.01 * b * b,   # superlinear: the line overshoots, then shrinks
])
def test_largest_batch_matches_brute_force(bytes_at):
  from medgen_jax.bench import train_step
  calls = []

  def counted(b):
    calls.append(b)
    return bytes_at(b)
  got = train_step.largest_batch(counted, 1000, start=16, multiple=16, cap=4096)
  assert got == _largest_by_brute_force(bytes_at, 1000, 16, 4096)
  assert len(calls) <= 5  # compiles, on a device tens of seconds each


def test_largest_batch_cap_start_and_errors():
  from medgen_jax.bench import train_step
  linear = lambda b: 100 + 7 * b
  assert train_step.largest_batch(linear, 1e9, start=16, multiple=16, cap=512) == 512
  assert train_step.largest_batch(linear, 100 + 7 * 20, start=16, multiple=16, cap=512) == 16
  with pytest.raises(ValueError, match="batch 16 already needs"):
    train_step.largest_batch(linear, 150, start=16, multiple=16, cap=512)


def test_cpu_memory_budget_is_the_configs():
  config = bench_config.get_config("quick")
  config.memory_budget_gb = 3.0
  assert attention_suite.memory_budget_bytes(config) == 3.0 * 2 ** 30


def test_gpu_variant_times_batch_16_and_the_largest_batch():
  config = bench_config.get_config("gpu")
  assert config.train_step.gan.train.batch_size == 16 and config.train_step.largest_batch
  assert not bench_config.get_config().train_step.largest_batch


@pytest.mark.slow  # compiles the quick GAN step at three batch sizes, then times one
def test_largest_batch_of_the_quick_gan_fits_the_budget():
  from configs import phantom_gan
  from medgen_jax.bench import train_step
  config = bench_config.get_config("quick")
  config.train_step.gan = phantom_gan.get_config("quick")
  config.train_step.batch_multiple = 4
  config.train_step.max_batch = 64
  step_bytes = train_step.step_bytes_fn(config.train_step.gan)
  four, eight = step_bytes(4), step_bytes(8)
  assert eight > four
  config.memory_budget_gb = (four + 3 * (eight - four)) / 2 ** 30  # room for about batch 16
  out = attention_suite.measure_largest_batch(config, matmul_rate=100.0)
  assert out["batch_size"] > 8 and out["batch_size"] % 4 == 0
  assert out["peak_bytes"] <= config.memory_budget_gb * 2 ** 30
  assert out["images_per_s"] == pytest.approx(out["batch_size"] / (out["step_ms"] * 1e-3), rel=1e-2)


def test_results_survive_a_run_cut_short(tmp_path, monkeypatch):
  # A time limit (a leased accelerator) can stop the run after any row: the
  # rows measured so far are on disk, marked incomplete.
  config = bench_config.get_config("quick")
  config.grids = ((8, 8),)
  config.variants = ("full", "window")

  def stopped(*args, **kwargs):
    raise KeyboardInterrupt("time limit")
  monkeypatch.setattr(attention_suite, "run_extras", stopped)
  with pytest.raises(KeyboardInterrupt):
    attention_suite.run_benchmark(config, str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["complete"] is False
  assert [r["variant"] for r in saved["rows"]] == ["full", "window"]
  assert all(r["status"] == "ok" for r in saved["rows"])
  assert not (tmp_path / "results.json.tmp").exists()


def test_rows_past_the_time_budget_are_skipped_and_extras_still_run(tmp_path):
  config = bench_config.get_config("quick")
  config.grids = ((8, 8), (16, 16))
  config.variants = ("full",)
  config.rows_time_budget_s = 0.0  # spent before the first row starts
  results = attention_suite.run_benchmark(config, str(tmp_path))
  assert [r["status"] for r in results["rows"]] == ["skipped", "skipped"]
  assert "rows_time_budget_s" in results["rows"][0]["reason"]
  assert results["rows"][1]["tokens"] == 256
  assert results["complete"] and results["swin_block_ms"] > 0
