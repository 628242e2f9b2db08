"""The Pallas kernels lower for the hardware they are written for, from a CPU.

`jax.export` with `platforms=['cuda']` / `['tpu']` runs Pallas' Triton and
Mosaic lowering here, with the library's shapes, dtypes and block sizes, so a
kernel whose blocks or layout its compiler rejects fails on CPU CI instead of
on a GPU host. What this cannot check is the last step on the device (Triton
to PTX, Mosaic to TPU code) or speed; tests/test_accelerator.py runs the
kernels natively. The numerics are checked in interpret mode by
tests/test_attention_kernels.py and tests/test_block_kernels.py.
"""
import contextlib

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from medgen_jax.attention import block_kernels, kernels

# (platform of jax.export, the kernel's custom-call target in the lowered module)
TARGETS = {"pallas_gpu": ("cuda", "__gpu$xla.gpu.triton"),
           "pallas_tpu": ("tpu", "tpu_custom_call")}
# Triton lowering needs the GPU's compute capability: from jax 0.11 it reads
# it from the abstract mesh's device when no GPU is attached.
TARGET_DEVICE = {"cuda": AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                        platform="gpu")}


def _target(platform):
  device = TARGET_DEVICE.get(platform)
  if device is None:
    return contextlib.nullcontext()
  return use_abstract_mesh(AbstractMesh((1,), ("devices",), axis_types=(AxisType.Auto,),
                                        abstract_device=device))


def kernel_calls(name, fn, *shapes):
  """Number of `name`'s kernel calls in `fn` lowered for that kernel's platform."""
  platform, target = TARGETS[name]
  # Kernel custom calls carry no serialisation guarantee; lowering is all
  # that is wanted here, so that check is off.
  with _target(platform):
    exported = export.export(jax.jit(fn), platforms=[platform],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(
                                 *shapes)
  return exported.mlir_module().count(f"@{target}(")


def fwd_and_grad(attend):
  """(forward, forward + q/k/v gradients) of `attend(q, k, v)`."""
  loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))
  return attend, jax.grad(loss, argnums=(0, 1, 2))


FULL_ATTENTION = {
    "pallas_gpu": lambda q, k, v: kernels.pallas_gpu_attention(q, k, v, interpret=False),
    "pallas_tpu": lambda q, k, v: kernels.pallas_tpu_attention(q, k, v, interpret=False),
}


@pytest.mark.parametrize("name", sorted(FULL_ATTENTION))
@pytest.mark.parametrize("dtype,shape", [
    ("bfloat16", (2, 1024, 8, 64)),
    ("float32", (2, 1024, 8, 64)),
    # The largest rows of the `:gpu` benchmark: 256^2 and 32^3 tokens.
    ("bfloat16", (1, 65536, 8, 64)),
    ("bfloat16", (2, 32768, 8, 64)),
])
def test_full_attention_kernels_lower_forward_and_backward(name, dtype, shape):
  q = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  forward, grad = fwd_and_grad(FULL_ATTENTION[name])
  n_forward = kernel_calls(name, forward, q, q, q)
  assert n_forward >= 1
  # The backward is kernels too, not an XLA fallback.
  assert kernel_calls(name, grad, q, q, q) > n_forward


@pytest.mark.parametrize("name", block_kernels.BLOCK_KERNELS)
def test_ring_block_kernels_lower(name):
  # The sequence-parallel ring's per-hop kernels, in each kernel's layout.
  shape = (2, 256, 2, 64) if block_kernels.TOKEN_AXIS[name] == 1 else (2, 2, 256, 64)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)

  def hop(q, k, v, dout):
    out, lse = block_kernels.forward(name, q, k, v, interpret=False)
    return block_kernels.backward(name, q, k, v, out, lse, dout, interpret=False)
  assert kernel_calls(name, lambda q, k, v: block_kernels.forward(
      name, q, k, v, interpret=False), x, x, x) == 1
  assert kernel_calls(name, hop, x, x, x, x) >= 2


def test_interpret_mode_lowers_to_no_kernel():
  # The check above can fail: the interpreter's lowering has no kernel call.
  q = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.float32)
  assert kernel_calls("pallas_gpu", lambda q, k, v: kernels.pallas_gpu_attention(
      q, k, v, interpret=True), q, q, q) == 0
