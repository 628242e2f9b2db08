"""Sequence-parallel attention: ring and all-to-all axial equal unsharded attention.

The 8-device checks (values, q/k/v/bias gradients, output PartitionSpecs on
meshes data=2 x seq=4 and seq=8) run in a subprocess, tests/sequence_parallel_check.py,
since the simulated device count must be set before JAX initialises and this
pytest process may already have initialised it. The in-process tests use a
one-device mesh, where the ring is a single block and nothing is exchanged.
"""
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from medgen_jax.attention import sequence_parallel as sp

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_eight_simulated_devices_match_unsharded():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sequence_parallel_check.py")],
                        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
  assert "ALL OK" in proc.stdout, proc.stdout


def _one_device_mesh():
  return jax.make_mesh((1, 1), ("data", "seq"), axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:1])


def test_single_device_ring_matches_softmax_with_bias():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 4)), jnp.float32) for _ in range(3))
  bias = jnp.asarray(rng.normal(size=(2, 6, 6)), jnp.float32)  # [h, N, M]
  out = sp.sequence_parallel_full_attention(q, k, v, mesh=_one_device_mesh(), bias=bias)
  s = np.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(4) + np.asarray(bias)[None]
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bhnm,bmhd->bnhd", p, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(seq_axis="tokens"), "seq_axis 'tokens' is not an axis"),
    (dict(batch_axis="model"), "pass batch_axis=None"),
])
def test_wrapper_rejects_unknown_mesh_axes(kwargs, fragment):
  x = jnp.zeros((1, 4, 1, 2))
  with pytest.raises(ValueError, match=fragment):
    sp.sequence_parallel_full_attention(x, x, x, mesh=_one_device_mesh(), **kwargs)


def test_bad_shapes_raise():
  mesh = _one_device_mesh()
  x = jnp.zeros((1, 4, 1, 2))
  with pytest.raises(ValueError, match="does not broadcast"):
    sp.sequence_parallel_full_attention(x, x, x, mesh=mesh, bias=jnp.zeros((1, 1, 3, 4)))
  with pytest.raises(ValueError, match="expects"):
    sp.sequence_parallel_axial_attention(x, x, x, axis=0, mesh=mesh)
  y = jnp.zeros((1, 4, 4, 1, 2))
  with pytest.raises(ValueError, match="out of range"):
    sp.sequence_parallel_axial_attention(y, y, y, axis=2, mesh=mesh)


@pytest.mark.parametrize("backend, q_local, head_dim, has_bias, want", [
    ("gpu", 1024, 64, False, "pallas_gpu"),
    ("cuda", 1024, 64, False, "pallas_gpu"),
    ("gpu", 1024, 64, True, "xla"),       # the kernels take no bias
    ("gpu", 1000, 64, False, "xla"),      # 128-token blocks do not divide 1000
    ("tpu", 1024, 64, False, "pallas_tpu"),
    ("tpu", 1024, 96, False, "pallas_tpu"),
    ("tpu", 1024, 192, False, "xla"),     # head_dim > 128 and not a multiple of 128
    ("tpu", 64, 64, False, "xla"),        # below one 128-token tile
    ("cpu", 1024, 64, False, "xla"),
])
def test_ring_implementation_table(backend, q_local, head_dim, has_bias, want):
  assert sp.choose_ring_implementation(backend, q_local, q_local, head_dim,
                                       has_bias=has_bias) == want


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
def test_single_device_kernel_ring_matches_softmax(implementation):
  """One hop of each Pallas kernel (interpreted), values and q/k/v gradients.

  The 8-device subprocess checks the multi-hop merge with the GPU kernel; the
  TPU kernel's interpreter does not run in a multi-device shard_map.
  """
  rng = np.random.default_rng(1)
  q, k, v, w = (jnp.asarray(rng.normal(size=(1, 128, 2, 16)), jnp.float32) for _ in range(4))
  mesh = _one_device_mesh()

  def dense(q, k, v):
    s = jnp.einsum("bnhd,bmhd->bhnm", q, k, precision="highest") / math.sqrt(16)
    return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, -1), v, precision="highest")

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2)))
  ring = lambda q, k, v: sp.sequence_parallel_full_attention(q, k, v, mesh=mesh,
                                                             implementation=implementation)
  (got, got_grads), (want, want_grads) = loss(ring)(q, k, v), loss(dense)(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, r in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_kernel_ring_refuses_bias_and_untileable_shards():
  x = jnp.zeros((1, 128, 1, 16))
  with pytest.raises(ValueError, match="takes no bias"):
    sp.sequence_parallel_full_attention(x, x, x, mesh=_one_device_mesh(),
                                        bias=jnp.zeros((1, 1, 128, 128)),
                                        implementation="pallas_tpu")
  y = jnp.zeros((1, 100, 1, 16))
  with pytest.raises(ValueError, match="cannot tile"):
    sp.sequence_parallel_full_attention(y, y, y, mesh=_one_device_mesh(),
                                        implementation="pallas_tpu")
  with pytest.raises(ValueError, match="is not one of"):
    sp.sequence_parallel_full_attention(x, x, x, mesh=_one_device_mesh(),
                                        implementation="cudnn")
