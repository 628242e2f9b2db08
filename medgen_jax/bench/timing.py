"""Timing, memory and FLOP measurements of jitted functions.

All numbers come from one compiled executable: compile time from `lower().compile()`,
FLOPs and peak bytes from XLA's own cost and memory analyses, run time as the
median of several calls after warm-up (with `block_until_ready`).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Measurement:
  compile_s: float
  median_ms: float
  min_ms: float
  flops: float | None
  peak_bytes: int | None


def compile_fn(fn: Callable[..., Any], args: Sequence[Any]):
  """Lowers and compiles `fn` for `args`; returns (compiled, seconds)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def xla_flops(compiled) -> float | None:
  """FLOPs counted by XLA's cost analysis (None when the backend gives none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def xla_peak_bytes(compiled) -> int | None:
  """Peak device memory of one call according to XLA's buffer assignment."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  # Arguments + outputs + XLA's packed temporaries. (`peak_memory_in_bytes`
  # on the CPU backend leaves the temporaries out: it reports 28 MiB for a
  # dense 2048-token attention whose score tensors alone take 800 MiB.)
  total = int(stats.argument_size_in_bytes + stats.output_size_in_bytes
              + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return max(total, int(getattr(stats, "peak_memory_in_bytes", 0) or 0))


def time_compiled(compiled, args: Sequence[Any], *, warmup: int, repeats: int,
                  max_seconds: float | None = None) -> list[float]:
  """Wall-clock milliseconds of `repeats` calls after `warmup` calls.

  With `max_seconds`, slow functions get fewer repeats (at least one), so the
  timed calls take about that long: the default benchmark must fit in minutes.
  """
  first = None
  for _ in range(warmup):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - start
  if max_seconds is not None and first:
    repeats = max(1, min(repeats, int(max_seconds / first)))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return times


def measure(fn: Callable[..., Any], args: Sequence[Any], *, warmup: int = 1,
            repeats: int = 3) -> Measurement:
  compiled, compile_s = compile_fn(fn, args)
  times = time_compiled(compiled, args, warmup=warmup, repeats=repeats)
  return Measurement(compile_s=compile_s, median_ms=statistics.median(times),
                     min_ms=min(times), flops=xla_flops(compiled),
                     peak_bytes=xla_peak_bytes(compiled))


def matmul_gflops_per_s(size: int = 2048, *, repeats: int = 5,
                        dtype=jnp.float32) -> float:
  """Dense matmul throughput of this backend: the roofline for MFU figures."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), dtype)
  m = measure(lambda x, y: x @ y, (a, b), warmup=2, repeats=repeats)
  return 2.0 * size ** 3 / (m.min_ms * 1e-3) / 1e9
