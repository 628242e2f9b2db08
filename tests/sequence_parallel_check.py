"""Multi-device checks for medgen_jax.attention.sequence_parallel (run as a script).

tests/test_sequence_parallel.py runs this in a subprocess, because the number
of simulated CPU devices is fixed when JAX initialises and other test modules
may already have initialised it in the pytest process. Every check compares
against a dense softmax written here, independent of the library, in values
and in gradients, and asserts the exact PartitionSpec of the output. Exits
non-zero (AssertionError) on the first mismatch.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from medgen_jax.attention import sequence_parallel as sp  # noqa: E402

TOL = dict(rtol=2e-5, atol=2e-5)


def dense_attention(q, k, v, bias=None):
  """Plain softmax attention, `[B, N, h, d]`, the unsharded reference."""
  s = jnp.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    s = s + bias
  return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, axis=-1), v)


def dense_axial(q, k, v, axis):
  """Softmax along spatial `axis` only: every other position is a batch entry."""
  ax = 1 + axis
  move = lambda x: jnp.moveaxis(x, ax, -3)  # [..., L, h, d]
  qm, km, vm = move(q), move(k), move(v)
  s = jnp.einsum("...nhd,...mhd->...hnm", qm, km) / np.sqrt(q.shape[-1])
  out = jnp.einsum("...hnm,...mhd->...nhd", jax.nn.softmax(s, axis=-1), vm)
  return jnp.moveaxis(out, -3, ax)


def randn(rng, shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def value_and_grads(fn, w):
  """One jitted program: outputs and the gradients of sum(out * w) wrt every arg."""
  def loss(*args):
    out = fn(*args)
    return jnp.sum(out * w), out
  return jax.jit(lambda *args: jax.grad(loss, tuple(range(len(args))), has_aux=True)(*args)[::-1])


def check_same(fn, ref, args, *, expected_spec, label):
  """Compares values and gradients of `fn` (sharded) with `ref` for all args."""
  # A random cotangent, so every output element's gradient path is exercised.
  w = randn(np.random.default_rng(7), jax.eval_shape(ref, *args).shape)
  out, got = value_and_grads(fn, w)(*args)
  expected, want = value_and_grads(ref, w)(*args)
  assert out.sharding.spec == expected_spec, (label, out.sharding.spec, expected_spec)
  np.testing.assert_allclose(out, expected, **TOL, err_msg=f"{label}: values")
  for i, (g, r) in enumerate(zip(got, want)):
    assert g.shape == args[i].shape, (label, i, g.shape)
    np.testing.assert_allclose(g, r, **TOL, err_msg=f"{label}: grad of arg {i}")
  print(f"ok {label}: max |out diff| {float(np.abs(out - expected).max()):.1e}", flush=True)


def auto_mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def check_ring():
  rng = np.random.default_rng(0)
  # data x seq, batch sharded too; the bias is shared by batch and heads, so
  # its gradient sums over both and over the data shards.
  mesh = auto_mesh((2, 4), ("data", "seq"))
  q, k, v = (randn(rng, (2, 32, 2, 8)) for _ in range(3))
  bias = randn(rng, (1, 1, 32, 32))
  # 8 local queries in chunks of 4: two inner steps per hop.
  fn = lambda q, k, v, b: sp.sequence_parallel_full_attention(q, k, v, mesh=mesh, bias=b,
                                                              chunk_size=4)
  check_same(fn, dense_attention, (q, k, v, bias), expected_spec=P("data", "seq"),
             label="ring data=2 seq=4 + shared bias, chunk 4")

  # seq only, odd batch, cross-attention (kv_len != q_len) and a per-head bias
  # shared across the batch, unchunked.
  mesh = auto_mesh((8,), ("seq",))
  q = randn(rng, (3, 32, 2, 8))
  k, v = randn(rng, (3, 16, 2, 8)), randn(rng, (3, 16, 2, 8))
  bias = randn(rng, (1, 2, 32, 16))
  fn = lambda q, k, v, b: sp.sequence_parallel_full_attention(
      q, k, v, mesh=mesh, batch_axis=None, bias=b)
  check_same(fn, dense_attention, (q, k, v, bias), expected_spec=P(None, "seq"),
             label="ring seq=8 cross-attention + bias")

  # The same code under an explicit-sharding mesh set as the ambient mesh.
  mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
  q, k, v = (randn(rng, (2, 16, 1, 4)) for _ in range(3))
  with jax.set_mesh(mesh):
    fn = lambda q, k, v: sp.sequence_parallel_full_attention(q, k, v, mesh=mesh)
    # Explicit sharding types spell out every array axis.
    check_same(fn, dense_attention, (q, k, v),
               expected_spec=P("data", "seq", None, None), label="ring explicit mesh")


def check_ring_kernels():
  """The ring with a fused Pallas kernel per hop (GPU kernel, interpreted on CPU).

  The Pallas TPU kernel is not run here: its CPU interpreter simulates TPU
  memory and barriers across devices and does not run inside an 8-device
  shard_map; tests/test_sequence_parallel.py checks it on a one-device mesh
  and tests/test_block_kernels.py its per-block merge.
  """
  rng = np.random.default_rng(2)
  mesh = auto_mesh((2, 4), ("data", "seq"))
  q, k, v = (randn(rng, (2, 128, 2, 16)) for _ in range(3))  # 32 local tokens
  fn = lambda q, k, v: sp.sequence_parallel_full_attention(q, k, v, mesh=mesh,
                                                           implementation="pallas_gpu")
  check_same(fn, dense_attention, (q, k, v), expected_spec=P("data", "seq"),
             label="ring data=2 seq=4, pallas_gpu kernel per hop")

  # Inside a model: SequenceSharding's attention_fn picks the kernel (as on a
  # GPU) and turns vma checking off for its shard_map.
  layout = sp.SequenceSharding(mesh=mesh, rules=(("batch", "data"), ("depth", "seq")))
  grid = lambda x: x.reshape(2, 8, 4, 4, 2, 16)  # [B, D, H, W, heads, head_dim]
  chosen = sp.choose_ring_implementation
  sp.choose_ring_implementation = lambda *a, **kw: "pallas_gpu"
  try:
    fn = lambda q, k, v: layout.attention_fn(sp.RING)(grid(q), grid(k), grid(v)).reshape(q.shape)
    check_same(jax.jit(fn), dense_attention, (q, k, v), expected_spec=P("data", "seq"),
               label="model attention_fn 'full', pallas_gpu kernel per hop")
  finally:
    sp.choose_ring_implementation = chosen

  # Under shard_map's vma check a forced kernel is refused with the remedy.
  def checked(q, k, v):
    return sp.ring_attention(q, k, v, axis_name="seq", implementation="pallas_gpu")
  spec = P("data", "seq")
  placed = [jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in (q, k, v)]
  expect_value_error(lambda: jax.shard_map(checked, mesh=mesh, in_specs=(spec,) * 3,
                                           out_specs=spec)(*placed), "check_vma=False")


def check_axial():
  rng = np.random.default_rng(1)
  cases = [
      # (mesh, batch_axis, shape, sharded axis, expected spec); the first
      # re-shards over heads (4 % 4 == 0), the 3D ones over a spatial axis
      # (2 heads on 8 devices) and over heads with the 2nd axis sharded.
      (auto_mesh((2, 4), ("data", "seq")), "data", (2, 8, 4, 4, 8), 0, P("data", "seq")),
      (auto_mesh((8,), ("seq",)), None, (1, 8, 8, 2, 2, 4), 0, P(None, "seq")),
      (auto_mesh((2, 4), ("data", "seq")), "data", (2, 2, 8, 2, 4, 4), 1,
       P("data", None, "seq")),
  ]
  for mesh, batch_axis, shape, sharded, spec in cases:
    q, k, v = (randn(rng, shape) for _ in range(3))
    num = len(shape) - 3
    for axis in (sharded, (sharded + 1) % num):
      fn = lambda q, k, v, axis=axis: sp.sequence_parallel_axial_attention(
          q, k, v, axis=axis, mesh=mesh, sharded_spatial_axis=sharded,
          batch_axis=batch_axis)
      ref = lambda q, k, v, axis=axis: dense_axial(q, k, v, axis)
      kind = "sharded" if axis == sharded else "local"
      check_same(fn, ref, (q, k, v), expected_spec=spec,
                 label=f"axial {num}D {shape} sharded={sharded} axis={axis} ({kind})")


def expect_value_error(fn, fragment):
  try:
    fn()
  except ValueError as e:
    assert fragment in str(e), (fragment, str(e))
    print(f"ok ValueError: {e}", flush=True)
    return
  raise AssertionError(f"expected ValueError containing {fragment!r}")


def check_errors():
  mesh = auto_mesh((8,), ("seq",))
  x = jnp.zeros((1, 12, 2, 4))
  expect_value_error(lambda: sp.sequence_parallel_full_attention(
      x, x, x, mesh=mesh, batch_axis=None), "not divisible")
  expect_value_error(lambda: sp.sequence_parallel_full_attention(
      x, x, x, mesh=mesh), "batch_axis=None")
  z = jnp.zeros((1, 24, 2, 4))  # 3 local queries per device
  expect_value_error(lambda: sp.sequence_parallel_full_attention(
      z, z, z, mesh=mesh, batch_axis=None, chunk_size=2), "positive divisor")
  # 3 heads and spatial sizes 8, 4: nothing else splits 8 ways.
  y = jnp.zeros((1, 8, 4, 3, 4))
  expect_value_error(lambda: sp.sequence_parallel_axial_attention(
      y, y, y, axis=0, mesh=mesh, batch_axis=None), "divisible by 8")


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  check_errors()
  check_ring()
  check_ring_kernels()
  check_axial()
  print("ALL OK")
