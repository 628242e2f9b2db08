"""The fused attention kernels running natively on a GPU or TPU.

Skipped on CPU, where tests/test_attention_kernels.py, test_block_kernels.py
and test_sequence_parallel.py check the same kernels in Pallas' interpreter.
On an accelerator host (docs/benchmarks.md, "Checking on a device"):

  JAX_DEFAULT_MATMUL_PRECISION=highest python -m pytest tests/test_accelerator.py

Each check compares against float32 softmax attention written here, values
and q/k/v gradients, by relative error over the whole array (bf16 keeps ~3
significant digits), and checks that the kernel the library claims to run is
the one in the compiled program.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.attention import full_attention, kernels, window_attention
from medgen_jax.attention import sequence_parallel as sp
from test_attention_reference import dense_reference, window_mask_and_local
from test_block_kernels import merged_halves
from test_sequence_parallel import _one_device_mesh

BACKEND = jax.default_backend()
pytestmark = pytest.mark.skipif(BACKEND not in ("gpu", "tpu"),
                                reason="needs a GPU or TPU (the CPU tests interpret the kernels)")

# What each fused kernel leaves in the lowered program.
KERNEL_MARKERS = {"cudnn": ("__cudnn$fmha",),
                  "pallas_gpu": ("xla.gpu.triton", "mosaic_gpu"),
                  "pallas_tpu": ("tpu_custom_call",)}
NATIVE = {"gpu": ("xla", "chunked", "cudnn", "pallas_gpu"),
          "tpu": ("xla", "chunked", "pallas_tpu")}.get(BACKEND, ())
BF16_REL = 2e-2   # relative error of bf16 inputs / kernels against float32
F32_REL = 5e-3    # float32 through kernels that may use TF32 / bf16 passes


def reference(q, k, v):
  """float32 softmax attention, `[B, N, h, d]` -> `[B, N, h, d]`."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  s = jnp.einsum("bnhd,bmhd->bhnm", q, k, precision="highest") / math.sqrt(q.shape[-1])
  return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, -1), v, precision="highest")


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def qkv(shape, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys]


def assert_matches(fn, ref, args, rel):
  """Values and grads of sum(out * w) of `fn` against `ref` (w: last of args)."""
  *inputs, w = args
  def grads(f):
    loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(inputs)))))(*inputs)
  out, ref_out = jax.jit(fn)(*inputs), ref(*inputs)
  assert rel_err(out, ref_out) < rel, rel_err(out, ref_out)
  (_, got), (_, want) = grads(fn), grads(ref)
  for name, g, r in zip("qkv", got, want):
    assert rel_err(g, r) < rel, (name, rel_err(g, r))


def lowered_text(fn, *args):
  return jax.jit(fn).lower(*args).as_text()


def test_default_full_attention_runs_the_fused_kernel():
  # bf16, no bias or mask: cuDNN on GPU, Pallas flash on TPU (module table).
  args = qkv((2, 1024, 8, 64), jnp.bfloat16)
  choice = kernels.choose_implementation(BACKEND, jnp.bfloat16, args[0].shape,
                                         args[1].shape, has_bias=False, has_mask=False)
  assert choice.implementation == {"gpu": "cudnn", "tpu": "pallas_tpu"}[BACKEND]
  text = lowered_text(full_attention, *args[:3])
  assert any(m in text for m in KERNEL_MARKERS[choice.implementation]), choice
  assert_matches(full_attention, reference, args, BF16_REL)


@pytest.mark.parametrize("implementation", NATIVE)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_each_native_implementation_matches_reference(implementation, dtype):
  if implementation == "cudnn" and dtype == "float32":
    pytest.skip("cuDNN flash attention takes bf16/fp16 only")
  args = qkv((2, 512, 4, 64), jnp.dtype(dtype), seed=1)
  fn = functools.partial(full_attention, implementation=implementation)
  if implementation in KERNEL_MARKERS:
    text = lowered_text(fn, *args[:3])
    assert any(m in text for m in KERNEL_MARKERS[implementation])
  assert_matches(fn, reference, args, BF16_REL if dtype == "bfloat16" else F32_REL)


@pytest.mark.parametrize("implementation", [None] + [i for i in NATIVE if i == "cudnn"])
def test_shifted_windows_with_relative_bias(implementation):
  # The model's Swin layer: relative position bias and the region mask. The
  # default runs XLA's dense path here; forced cuDNN takes both as a bf16 bias.
  b, grid, window, shift, heads, dim = 2, (16, 16), (8, 8), (4, 4), 4, 64
  q, k, v, w = qkv((b, *grid, heads, dim), jnp.bfloat16, seed=2)
  t = math.prod(window)
  bias = jax.random.normal(jax.random.key(5), (heads, t, t))
  allowed, local = window_mask_and_local(grid, window, shift)
  fn = lambda q, k, v: window_attention(q, k, v, window_size=window, shift=shift, bias=bias,
                                        implementation=implementation)
  ref = lambda q, k, v: dense_reference(q, k, v, allowed, bias[:, local][:, :, local])
  with jax.default_matmul_precision("highest"):
    assert_matches(fn, ref, (q, k, v, w), BF16_REL)


def test_block_kernel_lse_merge_natively():
  # The ring's per-hop kernel: two key blocks merged by their log-sum-exps
  # equal attention over both (test_block_kernels.py does this interpreted).
  name = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}[BACKEND]
  q, k, v, dout = qkv((2, 256, 2, 64), jnp.float32, seed=3)
  out, _, _, dq, dk, dv = merged_halves(name, q, k, v, dout, interpret=False)
  assert rel_err(out, reference(q, k, v)) < F32_REL
  _, vjp = jax.vjp(reference, q, k, v)
  for which, got, want in zip("qkv", (dq, dk, dv), vjp(dout)):
    assert rel_err(got, want) < F32_REL, which


def test_sequence_parallel_ring_picks_and_runs_the_kernel():
  mesh = _one_device_mesh()
  args = qkv((1, 1024, 4, 64), jnp.float32, seed=4)
  assert sp.choose_ring_implementation(BACKEND, 1024, 1024, 64, has_bias=False) != "xla"
  ring = functools.partial(sp.sequence_parallel_full_attention, mesh=mesh)
  text = lowered_text(ring, *args[:3])
  assert any(m in text for m in KERNEL_MARKERS["pallas_gpu"] + KERNEL_MARKERS["pallas_tpu"])
  assert_matches(ring, reference, args, F32_REL)
