"""The peer side of the Swin-block comparison: timm's `SwinTransformerBlock` in PyTorch.

PyTorch and timm are the optional `[bench]` extra (`pip install -e '.[bench]'`);
without them the measurement is recorded as unavailable, never an error.
"""
from __future__ import annotations

import statistics
import time
from typing import Any


def torch_swin_block_ms(*, dim: int, num_heads: int, window: int, shift: int,
                        mlp_ratio: float, batch: int, grid: int, threads: int,
                        warmup: int, repeats: int, seed: int = 0) -> dict[str, Any]:
  """Median forward+backward ms of one timm Swin block on `[batch, grid, grid, dim]`.

  Gradients flow to the input and every parameter (as in training), with
  `torch.set_num_threads(threads)` so both frameworks get the same cores.

  Returns:
    {'ms': float, 'min_ms', 'torch', 'timm', 'threads'} or
    {'ms': None, 'reason': why it could not run}.
  """
  # torch and timm are optional (the `bench` extra): imported here so the
  # benchmark runs, and reports why, without them.
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from timm.models.swin_transformer import SwinTransformerBlock  # pylint: disable=import-outside-toplevel
    import timm  # pylint: disable=import-outside-toplevel
  except Exception as e:  # ImportError, or a broken torchvision beside torch
    return {"ms": None, "reason": f"torch/timm not importable ({type(e).__name__}: {e}); "
                                  f"pip install -e '.[bench]'"}
  previous_threads = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    torch.manual_seed(seed)
    block = SwinTransformerBlock(dim=dim, input_resolution=(grid, grid), num_heads=num_heads,
                                 window_size=window, shift_size=shift, mlp_ratio=mlp_ratio)
    block.train()
    x = torch.randn(batch, grid, grid, dim, requires_grad=True)
    cotangent = torch.randn(batch, grid, grid, dim)

    def fwd_bwd():
      block.zero_grad(set_to_none=True)
      x.grad = None
      (block(x) * cotangent).sum().backward()

    for _ in range(warmup):
      fwd_bwd()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fwd_bwd()
      times.append((time.perf_counter() - start) * 1e3)
  finally:
    torch.set_num_threads(previous_threads)
  return {"ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
          "torch": torch.__version__, "timm": timm.__version__, "threads": threads}
