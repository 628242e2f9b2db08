"""Attention benchmark: fwd+bwd time, peak memory and FLOPs per variant and size.

  python -m experiments.benchmark_attention --config configs/benchmark_attention.py --workdir runs/bench
  python -m experiments.benchmark_attention --config configs/benchmark_attention.py:quick --workdir /tmp/bench
  python -m experiments.benchmark_attention --config configs/benchmark_attention.py:gpu --workdir runs/bench_gpu

`gpu` (any accelerator): bf16, 8 heads x 64, batch x tokens = 65,536, grids up
to 256^2 = 65,536 tokens in 2D and 32^3 in 3D, plus the `cudnn` (GPU) and
`pallas` (GPU: Triton, TPU: Pallas TPU flash) rows, and axial / window
attention with the kernel forced (`axial_xla`, `window_xla`: the dense einsum
path beside the default fused kernel; `window_shifted_cudnn`: cuDNN with the
Swin mask beside the default dense path); every row also reports
`fraction_of_matmul`, its rate over a bf16 matmul measured in the same run;
the training step of `phantom_gan.py:gpu` is timed at batch 16 and at the
largest batch that fits the device (`train_step.largest_batch`).
"""
import ml_collections

from configs import common, phantom_gan


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.variants = ("full", "full_chunked", "xla_baseline", "axial", "window",
                     "window_shifted")
  # 2D grids 16^2 .. 128^2 (256 .. 16384 tokens) and 3D grids 8^3, 16^3.
  config.grids = ((16, 16), (32, 32), (64, 64), (128, 128), (8, 8, 8),
                  (16, 16, 16))
  config.batch_size = 4          # examples per call, ...
  config.max_batch_tokens = 16384  # ... reduced so batch * tokens <= this
  config.num_heads = 4
  config.head_dim = 32
  config.window_size = 8
  config.chunk_size = ml_collections.config_dict.placeholder(int)  # None: default block
  config.dtype = "float32"
  config.warmup = 1
  config.repeats = 3
  config.max_seconds_per_row = 15.0  # slow rows get fewer repeats (>= 1)
  config.seed = 0
  config.matmul_size = 2048
  config.memory_budget_gb = 12.0  # rows above this XLA peak are reported as out_of_memory
  # Rows that would start after this many seconds are reported 'skipped'
  # (None: no limit); the training step and Swin rows run either way.
  config.rows_time_budget_s = ml_collections.config_dict.placeholder(float)
  # MFU of one jitted training step (G + D) of the GAN config `gan`: the
  # default configs/phantom_gan.py, overridable field by field
  # (--config.train_step.gan.model.attention=axial).
  # With largest_batch, the step is timed again at the largest batch (a
  # multiple of batch_multiple, <= max_batch) that XLA's buffer assignment
  # fits in 90 % of the device's memory (CPU: memory_budget_gb).
  config.train_step = ml_collections.ConfigDict(dict(
      enabled=True, gan=phantom_gan.get_config(), repeats=3, largest_batch=False,
      batch_multiple=16, max_batch=4096))
  # Swin block side by side with timm (PyTorch, `torch_threads` threads);
  # medians of 7 calls each, since the two are within run-to-run noise here.
  config.swin = ml_collections.ConfigDict(dict(
      enabled=True, dim=128, num_heads=4, window=8, shift=4, mlp_ratio=4.0, batch=8,
      grid=64, torch_threads=2, warmup=1, repeats=7))
  variants, _ = common.parse_variants(arg, config="benchmark_attention",
                                      flags=("quick", "gpu"))
  if "gpu" in variants:
    config.variants = config.variants + ("cudnn", "pallas", "axial_xla", "window_xla",
                                         "window_shifted_cudnn")
    config.grids = ((64, 64), (128, 128), (256, 256), (16, 16, 16), (32, 32, 32))
    config.batch_size = 16
    config.max_batch_tokens = 65536
    config.num_heads = 8
    config.head_dim = 64
    config.dtype = "bfloat16"
    config.repeats = 10
    config.matmul_size = 8192
    config.memory_budget_gb = 70.0  # fits an 80 GiB H100 with headroom
    config.train_step.gan = phantom_gan.get_config("gpu")
    config.train_step.gan.train.batch_size = 16  # and again at the largest that fits
    config.train_step.largest_batch = True
    config.swin.enabled = False  # the timm peer row is a CPU comparison
  if "quick" in variants:
    config.grids = ((8, 8), (16, 16), (4, 4, 4))
    config.window_size = 4
    config.chunk_size = 32
    config.repeats = 1
    config.matmul_size = 256
    config.batch_size = min(config.batch_size, 4)
    config.max_batch_tokens = min(config.max_batch_tokens, 16384)
    config.train_step.enabled = False  # compiling the GAN step takes minutes
    config.swin.update(dim=16, num_heads=2, window=4, shift=2, batch=1, grid=8,
                       repeats=1)
  return config
