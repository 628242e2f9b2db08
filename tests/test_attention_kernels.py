"""full_attention's per-backend kernel choice, and every CPU-runnable kernel
against the brute-force reference (values and gradients).

The choice is a pure function of (backend, dtype, shapes, bias/mask), so the
GPU and TPU rows of the table are tested here by naming the backend. The
Pallas kernels run in their interpreters on CPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.attention import full_attention, kernels
from test_attention_reference import assert_values_and_grads, dense_reference, random_qkv

BF16, F32, F16 = jnp.bfloat16, jnp.float32, jnp.float16


def choose(backend, dtype, n, m=None, *, batch=2, heads=8, head_dim=64, bias=False,
           mask=False):
  m = n if m is None else m
  return kernels.choose_implementation(
      backend, dtype, (batch, n, heads, head_dim), (batch, m, heads, head_dim),
      has_bias=bias, has_mask=mask)


@pytest.mark.parametrize("backend,dtype,n,kw,want", [
    # GPU: cuDNN for bf16/fp16 without bias or mask, whatever the length.
    ("gpu", BF16, 4096, {}, "cudnn"),
    ("cuda", F16, 65536, {}, "cudnn"),
    ("gpu", BF16, 64, {}, "cudnn"),
    ("gpu", BF16, 4096, dict(head_dim=160), "xla"),   # > 128: not on every GPU
    ("gpu", BF16, 4096, dict(head_dim=60), "xla"),    # not a multiple of 8
    ("gpu", F32, 256, {}, "xla"),                     # cuDNN takes no float32
    ("gpu", F32, 65536, {}, "chunked"),               # dense scores > 2^28
    ("gpu", BF16, 256, dict(bias=True), "xla"),       # relative position bias
    ("gpu", BF16, 64, dict(mask=True, batch=512), "xla"),  # Swin windows
    ("gpu", BF16, 16384, dict(bias=True), "chunked"),
    # TPU: Pallas flash for lengths that are multiples of 128.
    ("tpu", BF16, 4096, {}, "pallas_tpu"),
    ("tpu", F32, 256, {}, "pallas_tpu"),
    ("tpu", F32, 256, dict(head_dim=256), "pallas_tpu"),
    ("tpu", F32, 256, dict(head_dim=192), "xla"),
    ("tpu", BF16, 64, {}, "xla"),                     # 64 % 128 != 0
    ("tpu", BF16, 4096, dict(mask=True), "xla"),      # 2^28 scores: still dense
    ("tpu", BF16, 8192, dict(mask=True), "chunked"),
    # CPU: unchanged, chunked from 512 x 512 scores, whatever dtype or bias.
    ("cpu", F32, 256, {}, "xla"),
    ("cpu", BF16, 511, {}, "xla"),
    ("cpu", F32, 512, {}, "chunked"),
    ("cpu", BF16, 4096, {}, "chunked"),
    ("cpu", F32, 1024, dict(bias=True, mask=True), "chunked"),
])
def test_decision_table(backend, dtype, n, kw, want):
  assert choose(backend, dtype, n, **kw).implementation == want


def test_dense_threshold_is_the_score_count_on_accelerators():
  # batch * heads * N * M = 2^28 exactly is dense, one more row of keys is not.
  assert choose("gpu", F32, 4096, batch=2, heads=8).implementation == "xla"
  assert choose("gpu", F32, 4096, 4097, batch=2, heads=8).implementation == "chunked"
  assert choose("gpu", F32, 4096, batch=4, heads=8).implementation == "chunked"


def test_cross_attention_lengths_on_tpu():
  assert choose("tpu", BF16, 256, 384).implementation == "pallas_tpu"
  assert choose("tpu", BF16, 256, 200).implementation == "xla"


def test_chunked_blocks():
  cpu = choose("cpu", F32, 4096, batch=4, heads=4)
  assert cpu.chunk_size == kernels.cpu_chunk_size(4, 4, 4096, 4096)
  gpu = choose("gpu", F32, 65536, batch=1, heads=8)
  assert gpu.chunk_size == (1024, 1024) and 8 * 1024 * 1024 == kernels.ACCEL_BLOCK_SCORES // 2
  # The block never drops below 64 (CPU) / 128 (accelerators) for many maps.
  assert choose("cpu", F32, 4096, batch=4096, heads=8).chunk_size == (64, 64)
  assert choose("tpu", F32, 8192, batch=4096, heads=8, mask=True).chunk_size == (128, 128)


@pytest.mark.parametrize("batch,heads,n,cores,want", [
    # Two loops of 8 maps: 2^21 scores as 2048 queries x 128 keys (as measured).
    (4, 4, 4096, 2, (2048, 128)),
    (4, 4, 4096, 1, (1024, 128)),       # one loop of 16 maps
    (1, 4, 16384, 2, (8192, 128)),      # batch 1: the heads are split
    (4, 4, 1024, 2, (1024, 128)),       # one query block covers the queries
    (4, 4, 512, 2, (512, 128)),
    (4096, 8, 4096, 2, (64, 64)),       # never below 64
    (1, 1, 1 << 20, 1, (8192, 128)),    # never above 8192 queries
])
def test_cpu_chunk_size(batch, heads, n, cores, want):
  got = kernels.cpu_chunk_size(batch, heads, n, n, cores=cores)
  assert got == want
  maps = batch * heads // kernels.cpu_groups(batch, heads, cores)
  assert maps * got[0] * got[1] <= max(kernels.CPU_BLOCK_SCORES, maps * 64 * 64)


def full_reference(q, k, v, bias=None, allowed=None):
  """Brute-force attention of [B, N, h, d] inputs (bias [B|1, h|1, N, M])."""
  n, m = q.shape[1], k.shape[1]
  allowed = np.ones((n, m), bool) if allowed is None else allowed
  if bias is None and n == m:
    return dense_reference(q, k, v, allowed)
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  return jnp.einsum("bhnm,bmhd->bnhd", probs, v)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_xla_and_chunked_match_reference(implementation):
  q, k, v, _ = random_qkv((2, 40, 2, 8), seed=11)
  bias = jax.random.normal(jax.random.PRNGKey(3), (1, 2, 40, 40))
  allowed = np.random.default_rng(1).random((40, 40)) > 0.3
  allowed[:, 0] = True
  fn = lambda q, k, v, b: full_attention(q, k, v, bias=b, mask=allowed,
                                         implementation=implementation)
  ref = lambda q, k, v, b: full_reference(q, k, v, b, allowed)
  assert_values_and_grads(fn, ref, (q, k, v, bias))


def test_pallas_tpu_interpret_matches_reference():
  # Lengths 256 (two 128-blocks: the online softmax crosses blocks) and a bias,
  # which the kernel adds before its own scale: full_attention pre-scales q.
  q, k, v, _ = random_qkv((1, 256, 2, 32), seed=12)
  bias = jax.random.normal(jax.random.PRNGKey(4), (1, 2, 256, 256))
  fn = lambda q, k, v, b: full_attention(q, k, v, bias=b, implementation="pallas_tpu")
  assert_values_and_grads(fn, full_reference, (q, k, v, bias), rtol=2e-5, atol=2e-5)


def test_pallas_tpu_interpret_with_mask_matches_reference():
  q, k, v, _ = random_qkv((1, 128, 1, 16), seed=13)
  allowed = np.random.default_rng(2).random((128, 128)) > 0.5
  allowed[:, 0] = True
  fn = lambda q, k, v: full_attention(q, k, v, mask=allowed, implementation="pallas_tpu")
  ref = lambda q, k, v: full_reference(q, k, v, None, allowed)
  assert_values_and_grads(fn, ref, (q, k, v), rtol=2e-5, atol=2e-5)


def test_pallas_tpu_rejects_lengths_it_cannot_tile():
  q, k, v, _ = random_qkv((1, 100, 1, 16))
  with pytest.raises(ValueError, match="multiples of 128"):
    full_attention(q, k, v, implementation="pallas_tpu")


@pytest.mark.slow  # Pallas' generic interpreter: ~30-70 s per call here
def test_pallas_gpu_interpret_matches_reference():
  q, k, v, _ = random_qkv((1, 64, 2, 8), seed=14)
  fn = lambda q, k, v: full_attention(q, k, v, implementation="pallas_gpu")
  assert_values_and_grads(fn, full_reference, (q, k, v))


def test_pallas_gpu_refuses_bias():
  q, k, v, _ = random_qkv((1, 64, 2, 8))
  with pytest.raises(ValueError, match="no bias"):
    full_attention(q, k, v, bias=jnp.zeros((64, 64)), implementation="pallas_gpu")


def test_cudnn_is_not_silently_replaced_on_cpu():
  # Forcing cuDNN where there is none must fail, not fall back quietly.
  q, k, v, _ = random_qkv((1, 64, 2, 8), dtype=BF16)
  with pytest.raises(Exception):
    jax.block_until_ready(full_attention(q, k, v, implementation="cudnn"))


def test_default_on_cpu_follows_the_table():
  # 512 x 512 scores: the chunked form (its loop appears in the HLO), below: dense.
  for n, want_loop in ((256, False), (512, True)):
    q = jnp.ones((1, n, 1, 8))
    hlo = jax.jit(lambda q: full_attention(q, q, q)).lower(q).as_text()
    assert ("while" in hlo) == want_loop, n


def test_cpu_groups_divide_batch_else_heads():
  assert kernels.cpu_groups(4, 4, cores=2) == 2
  assert kernels.cpu_groups(3, 4, cores=2) == 2   # 2 divides no batch of 3: the heads
  assert kernels.cpu_groups(1, 4, cores=2) == 2   # batch 1: split the heads
  assert kernels.cpu_groups(1, 1, cores=2) == 1
  assert kernels.cpu_groups(6, 1, cores=4) == 3   # largest count <= cores dividing 6


@pytest.mark.parametrize("shape,groups,bias_shape", [
    ((4, 24, 2, 8), 2, (1, 2, 24, 24)),   # split the batch; bias broadcast over it
    ((1, 24, 4, 8), 2, (1, 4, 24, 24)),   # batch 1: split the heads, and the bias's
    ((3, 24, 2, 8), 3, (3, 1, 24, 24)),
])
def test_grouped_chunked_matches_reference(shape, groups, bias_shape):
  from medgen_jax.attention.chunked import chunked_attention
  q, k, v, _ = random_qkv(shape, seed=15)
  bias = jax.random.normal(jax.random.PRNGKey(5), bias_shape)
  allowed = np.random.default_rng(3).random((24, 24)) > 0.3
  allowed[:, 0] = True
  mask = jnp.asarray(allowed)[None, None]
  fn = lambda q, k, v, b: chunked_attention(q, k, v, b, mask, 8, 8, groups=groups)
  ref = lambda q, k, v, b: full_reference(q, k, v, b, allowed)
  assert_values_and_grads(fn, ref, (q, k, v, bias))


def test_default_cpu_blocks_match_reference():
  # The default on CPU: chunked (600 x 523 >= 512^2 scores) with
  # `cpu_chunk_size`'s non-square blocks, keys padded to whole blocks, with a
  # bias and a mask.
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU default")
  q, k, v, _ = random_qkv((2, 600, 2, 8), seed=21)
  k, v = k[:, :523], v[:, :523]
  assert kernels.choose_implementation("cpu", F32, q.shape, k.shape, has_bias=True,
                                       has_mask=True).implementation == "chunked"
  bias = jax.random.normal(jax.random.PRNGKey(6), (1, 2, 600, 523))
  allowed = np.random.default_rng(4).random((600, 523)) > 0.3
  allowed[:, 0] = True
  mask = jnp.asarray(allowed)[None, None]
  fn = lambda q, k, v, b: full_attention(q, k, v, bias=b, mask=mask)
  ref = lambda q, k, v, b: full_reference(q, k, v, b, allowed)
  assert_values_and_grads(fn, ref, (q, k, v, bias))
