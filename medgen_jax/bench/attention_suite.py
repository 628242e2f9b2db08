"""The attention benchmark: every variant at every size, one process, one run.

Each row is forward+backward (gradients w.r.t. q, k and v) of one attention
layer's core on `[batch, *grid, heads, head_dim]` inputs. Compile time, XLA's
FLOP count and XLA's peak-memory estimate come from the same executable that is
timed. A configuration whose peak memory would exceed the budget is reported as
`out_of_memory` and never run.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from matplotlib.figure import Figure  # Agg canvas, no pyplot state

from medgen_jax import attention
from medgen_jax.attention.layers import TransformerBlock
from medgen_jax.bench import timing
from medgen_jax.bench import torch_swin
from medgen_jax.bench import train_step

# The restricted variants with their kernel forced: on an accelerator
# `full_attention`'s default for windows and axial lines is a fused kernel
# where one applies (cuDNN for bf16 without bias or mask), so these rows
# time the alternative at the same sizes: the dense einsum path ('xla'), and
# cuDNN taking the Swin mask (folded into a bf16 bias).
FORCED = {"axial_xla": ("axial", "xla"), "window_xla": ("window", "xla"),
          "window_shifted_cudnn": ("window_shifted", "cudnn")}
VARIANTS = ("full", "full_chunked", "xla_baseline", "axial", "window",
            "window_shifted", "cudnn", "pallas") + tuple(FORCED)
# Fused kernels that only exist on some backends: elsewhere their rows are
# reported as 'unsupported' (never run in an interpreter, which would time
# the interpreter).
_KERNEL_BACKENDS = {"cudnn": ("gpu",), "pallas": ("gpu", "tpu"),
                    "window_shifted_cudnn": ("gpu",)}


def _flat(x):
  """[B, *grid, h, d] -> [B, N, h, d]."""
  return x.reshape(x.shape[0], -1, *x.shape[-2:])


def variant_fn(name: str, grid: tuple[int, ...], *, window_size: int,
               chunk_size: int | None) -> Callable[..., jax.Array]:
  """The attention core of row `name` as f(q, k, v) -> out, same layout.

  A registry variant's row (and its `FORCED` form) is the registry entry's own
  function, the one the model's layers call; the other rows are kernels of
  the 'full' entry, and `jax.nn.dot_product_attention` as the baseline.
  """
  backend = jax.default_backend()
  if backend not in _KERNEL_BACKENDS.get(name, (backend,)):
    raise ValueError(f"variant {name!r} runs on {_KERNEL_BACKENDS[name]} only; "
                     f"this backend is {backend!r}")
  if name == "xla_baseline":
    return lambda q, k, v: jax.nn.dot_product_attention(
        _flat(q), _flat(k), _flat(v)).reshape(q.shape)
  if name == "full_chunked":  # always blocked; chunk_size None = default block
    return _registry_core("full", grid, window_size=window_size, chunk_size=chunk_size,
                          implementation="chunked")
  if name in ("cudnn", "pallas"):
    impl = "cudnn" if name == "cudnn" else f"pallas_{backend}"
    return _registry_core("full", grid, window_size=window_size, implementation=impl)
  base, implementation = FORCED.get(name, (name, None))
  if base not in attention.ATTENTION_VARIANTS:
    raise ValueError(f"unknown benchmark variant {name!r}; expected one of {VARIANTS}")
  # 'full' with no implementation is the library default: chunked on CPU
  # above 512^2 scores.
  return _registry_core(base, grid, window_size=window_size, implementation=implementation)


def _registry_core(name: str, grid: tuple[int, ...], *, window_size: int,
                   implementation: str | None, chunk_size: int | None = None
                   ) -> Callable[..., jax.Array]:
  """`ATTENTION_VARIANTS[name].fn` as f(q, k, v), its kernel forced unless `implementation` is None.

  A windowed variant gets `window_size` clipped to each axis of `grid` and
  its own default shift (half a window for a shifted variant, 0 along an
  axis the window covers whole).
  """
  variant = attention.get_attention(name)
  kwargs = {} if implementation is None else {"implementation": implementation}
  if chunk_size is not None:
    kwargs["chunk_size"] = chunk_size
  if variant.windowed:
    kwargs["window_size"] = tuple(min(window_size, g) for g in grid)
  return functools.partial(variant.fn, **kwargs)


def dense_equivalent(name: str, grid: tuple[int, ...], *,
                     window_size: int) -> Callable[..., jax.Array]:
  """The same math as variant `name` with XLA's dense attention, to count FLOPs.

  XLA counts a while loop's body once (the blocked form) and a fused kernel's
  custom call not at all (cuDNN, Pallas: on accelerators the default for
  windows and axial lines too), so each row is credited with the FLOPs of
  its loop-free dense form.
  """
  if name in ("full", "full_chunked", "xla_baseline", "cudnn", "pallas"):
    return variant_fn("xla_baseline", grid, window_size=window_size, chunk_size=None)
  return _registry_core(FORCED.get(name, (name, None))[0], grid, window_size=window_size,
                        implementation="xla")


def fwd_bwd(core: Callable[..., jax.Array]) -> Callable[..., Any]:
  """Forward + backward of `core` with a fixed random cotangent."""
  def loss(q, k, v, cotangent):
    return jnp.sum(core(q, k, v).astype(jnp.float32) * cotangent)
  return jax.grad(loss, argnums=(0, 1, 2))


def batch_for(tokens: int, config) -> int:
  return max(1, min(config.batch_size, config.max_batch_tokens // tokens))


def run_row(name: str, grid: tuple[int, ...], config,
            matmul_rate: float | None = None) -> dict[str, Any]:
  """One (variant, grid) row; `fraction_of_matmul` = its GFLOP/s / `matmul_rate`."""
  tokens = math.prod(grid)
  batch = batch_for(tokens, config)
  shape = (batch, *grid, config.num_heads, config.head_dim)
  row = dict(variant=name, grid=list(grid), tokens=tokens, batch=batch,
             heads=config.num_heads, head_dim=config.head_dim)
  try:
    core = variant_fn(name, grid, window_size=config.window_size,
                      chunk_size=config.chunk_size)
  except ValueError as e:
    return {**row, "status": "unsupported", "reason": str(e)}
  keys = jax.random.split(jax.random.PRNGKey(config.seed), 4)
  dtype = jnp.dtype(config.dtype)
  args = [jax.random.normal(k, shape, dtype) for k in keys[:3]]
  args.append(jax.random.normal(keys[3], shape, jnp.float32))
  try:
    compiled, compile_s = timing.compile_fn(fwd_bwd(core), args)
  except ValueError as e:  # e.g. a window that does not divide the grid
    return {**row, "status": "unsupported", "reason": str(e)}
  peak = timing.xla_peak_bytes(compiled)
  # Every row is credited with XLA's count for the same math in dense form,
  # whatever kernel runs (see `dense_equivalent`).
  dense = jax.jit(fwd_bwd(dense_equivalent(name, grid, window_size=config.window_size)))
  row.update(compile_s=round(compile_s, 3), peak_bytes=peak,
             flops=timing.xla_flops(dense.lower(*args)), flops_source="dense_equivalent")
  if peak is not None and peak > config.memory_budget_gb * 2**30:
    return {**row, "status": "out_of_memory",
            "reason": f"XLA peak {peak / 2**30:.1f} GiB > budget "
                      f"{config.memory_budget_gb} GiB"}
  times = timing.time_compiled(compiled, args, warmup=config.warmup,
                               repeats=config.repeats,
                               max_seconds=config.max_seconds_per_row)
  row.update(status="ok", fwd_bwd_ms=round(float(np.median(times)), 3),
             fwd_bwd_min_ms=round(min(times), 3))
  if row["flops"]:
    row["gflops_per_s"] = round(row["flops"] / (row["fwd_bwd_ms"] * 1e-3) / 1e9, 2)
    if matmul_rate:
      row["fraction_of_matmul"] = round(row["gflops_per_s"] / matmul_rate, 4)
  return row


def swin_block_ms(swin) -> dict[str, Any]:
  """fwd+bwd (grads of params and input) of one medgen_jax shifted-window block.

  `swin`: dim, num_heads, window, shift, mlp_ratio, batch, grid, warmup, repeats.
  The block is `TransformerBlock(attention='window_shifted')` with its learned
  relative position bias, like timm's `SwinTransformerBlock`.
  """
  block = TransformerBlock(num_heads=swin.num_heads, mlp_ratio=swin.mlp_ratio,
                           attention="window_shifted", window_size=swin.window,
                           shift=swin.shift)
  kx, kp, kc = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (swin.batch, swin.grid, swin.grid, swin.dim))
  params = block.init(kp, x[:1], deterministic=True)
  cotangent = jax.random.normal(kc, x.shape)

  def loss(params, x):
    return jnp.sum(block.apply(params, x, deterministic=True) * cotangent)
  m = timing.measure(jax.grad(loss, argnums=(0, 1)), (params, x), warmup=swin.warmup,
                     repeats=swin.repeats)
  return {"ms": round(m.median_ms, 2), "min_ms": round(m.min_ms, 2),
          "compile_s": round(m.compile_s, 2), "flops": m.flops}


def memory_budget_bytes(config) -> float:
  """What one program may use: 90 % of the device's memory where jax reports it
  (GPU, TPU), else `config.memory_budget_gb` (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return 0.9 * stats["bytes_limit"]
  return config.memory_budget_gb * 2 ** 30


def measure_largest_batch(config, matmul_rate: float) -> dict[str, Any]:
  """The training step timed at the largest batch (a multiple of
  `train_step.batch_multiple`, <= `train_step.max_batch`) that fits."""
  gan = config.train_step.gan
  size = train_step.largest_batch(
      train_step.step_bytes_fn(gan), memory_budget_bytes(config),
      start=int(gan.train.batch_size), multiple=config.train_step.batch_multiple,
      cap=config.train_step.max_batch)
  big = gan.copy_and_resolve_references()
  big.train.batch_size = size
  return train_step.measure_train_step(big, warmup=config.warmup,
                                       repeats=config.train_step.repeats,
                                       matmul_gflops_per_s=matmul_rate)


def run_extras(config, matmul_rate: float) -> dict[str, Any]:
  """train_step_mfu, swin_block_ms and torch_swin_block_ms (each None when off)."""
  out: dict[str, Any] = dict(train_step_mfu=None, swin_block_ms=None,
                             torch_swin_block_ms=None)
  if config.train_step.enabled:
    step = train_step.measure_train_step(config.train_step.gan, warmup=config.warmup,
                                         repeats=config.train_step.repeats,
                                         matmul_gflops_per_s=matmul_rate)
    out.update(train_step_mfu=step["mfu"], train_step=step)
    print(f"train step: {step['step_ms']:.0f} ms, {step['images_per_s']} images/s, "
          f"{step['gflops_per_s']} GFLOP/s, MFU {step['mfu']}", flush=True)
    if config.train_step.largest_batch:
      out["train_step_largest"] = largest = measure_largest_batch(config, matmul_rate)
      print(f"train step at the largest batch that fits ({largest['batch_size']}): "
            f"{largest['step_ms']:.0f} ms, {largest['images_per_s']} images/s, "
            f"MFU {largest['mfu']}", flush=True)
  swin = config.swin
  if swin.enabled:
    jax_swin = swin_block_ms(swin)
    out.update(swin_block_ms=jax_swin["ms"], swin_block=jax_swin)
    peer = torch_swin.torch_swin_block_ms(
        dim=swin.dim, num_heads=swin.num_heads, window=swin.window, shift=swin.shift,
        mlp_ratio=swin.mlp_ratio, batch=swin.batch, grid=swin.grid,
        threads=swin.torch_threads, warmup=swin.warmup, repeats=swin.repeats)
    out.update(torch_swin_block_ms=peer["ms"], torch_swin_block=peer)
    ratio = (f", torch/jax = {peer['ms'] / jax_swin['ms']:.2f}" if peer["ms"] else
             f" (torch: {peer.get('reason')})")
    print(f"swin block fwd+bwd: jax {jax_swin['ms']:.0f} ms, torch {peer['ms']} ms{ratio}",
          flush=True)
  return out


def machine_description() -> dict[str, Any]:
  return dict(backend=jax.default_backend(),
              devices=[str(d) for d in jax.devices()],
              cpu_count=os.cpu_count(), platform=platform.platform(),
              processor=platform.processor(), jax=jax.__version__)


def format_table(rows: list[dict[str, Any]]) -> str:
  head = f"{'variant':<15}{'grid':>9}{'tokens':>7}{'batch':>6}{'fwd+bwd ms':>12}" \
         f"{'peak MiB':>10}{'GFLOP':>9}{'GFLOP/s':>9}{'%mm':>6}  status"
  lines = [head, "-" * len(head)]
  for r in rows:
    ms = f"{r['fwd_bwd_ms']:.1f}" if "fwd_bwd_ms" in r else "-"
    peak = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else "-"
    gf = f"{r['flops'] / 1e9:.2f}" if r.get("flops") else "-"
    rate = f"{r['gflops_per_s']:.1f}" if "gflops_per_s" in r else "-"
    frac = f"{100 * r['fraction_of_matmul']:.0f}" if "fraction_of_matmul" in r else "-"
    grid = "x".join(str(g) for g in r["grid"])
    lines.append(f"{r['variant']:<15}{grid:>9}{r['tokens']:>7}{r['batch']:>6}{ms:>12}"
                 f"{peak:>10}{gf:>9}{rate:>9}{frac:>6}  {r['status']}")
  return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
  fig = Figure(figsize=(11, 4))
  axes = fig.subplots(1, 2)
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  # One line per variant and grid rank: 64x64 and 16x16x16 both have 4096
  # tokens but different axial / window costs, so they must not share a line.
  for i, name in enumerate(VARIANTS):
    for rank, style in ((2, "o-"), (3, "s--")):
      ok = sorted((r for r in rows if r["variant"] == name and r["status"] == "ok"
                   and len(r["grid"]) == rank), key=lambda r: r["tokens"])
      if not ok:
        continue
      tokens = [r["tokens"] for r in ok]
      kw = dict(color=colors[i % len(colors)], label=f"{name} ({rank}D)")
      axes[0].plot(tokens, [r["fwd_bwd_ms"] / r["batch"] for r in ok], style, **kw)
      axes[1].plot(tokens, [r["peak_bytes"] / r["batch"] / 2**20 for r in ok], style,
                   **kw)
  for ax, label in zip(axes, ("fwd+bwd ms per example", "XLA peak MiB per example")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  if axes[0].lines:
    axes[0].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _write_json(results: dict[str, Any], path: str) -> None:
  """Writes `results` to `path` atomically (a killed run leaves the last whole file)."""
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
  os.replace(path + ".tmp", path)


def run_benchmark(config, workdir: str) -> dict[str, Any]:
  """Runs every (variant, grid) of `config`; writes results.json and plots.

  results.json is rewritten after every row and again after the training
  step and Swin extras, with `complete` False until the end, so a run cut
  short by a time limit (e.g. a leased accelerator) keeps what it measured.
  With `rows_time_budget_s` set, rows that would start after that many
  seconds are reported 'skipped' and the extras still run.
  """
  os.makedirs(workdir, exist_ok=True)
  unknown = sorted(set(config.variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f"unknown benchmark variants {unknown}; expected a subset "
                     f"of {list(VARIANTS)}")
  grids = [tuple(g) for g in config.grids]
  path = os.path.join(workdir, "results.json")
  results: dict[str, Any] = dict(machine=machine_description(),
                                 config=config.to_dict(), complete=False, rows=[])
  results["matmul_gflops_per_s"] = round(
      timing.matmul_gflops_per_s(config.matmul_size), 2)
  # The roofline the rows are a fraction of: a matmul in the rows' own dtype
  # (bf16 on accelerators), measured in this same run.
  results["matmul_dtype"] = str(jnp.dtype(config.dtype))
  results["matmul_gflops_per_s_row_dtype"] = round(
      timing.matmul_gflops_per_s(config.matmul_size, dtype=jnp.dtype(config.dtype)), 2)
  rows = results["rows"]
  budget = config.get("rows_time_budget_s")
  start = time.perf_counter()
  for grid in grids:
    for name in config.variants:
      if budget is not None and time.perf_counter() - start > budget:
        tokens = math.prod(grid)
        rows.append(dict(variant=name, grid=list(grid), tokens=tokens,
                         batch=batch_for(tokens, config), status="skipped",
                         reason=f"rows_time_budget_s={budget} spent"))
      else:
        rows.append(run_row(name, grid, config, results["matmul_gflops_per_s_row_dtype"]))
      print(format_table(rows[-1:]).splitlines()[-1], flush=True)
      _write_json(results, path)
  results.update(run_extras(config, results["matmul_gflops_per_s"]))
  results["complete"] = True
  _write_json(results, path)
  plot(rows, os.path.join(workdir, "attention_scaling.png"))
  print(format_table(rows))
  print(f"dense matmul roofline: {results['matmul_gflops_per_s']:.1f} GFLOP/s")
  print(f"train_step_mfu: {results['train_step_mfu']}, swin_block_ms: "
        f"{results['swin_block_ms']}, torch_swin_block_ms: {results['torch_swin_block_ms']}")
  return results
