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
