"""Attention variants by name, each entry carrying the traits its callers need.

Every entry's `fn(q, k, v, *, window_size=None, shift=None, bias=None,
chunk_size=None)` maps q/k/v `[batch, *spatial, heads, head_dim]` to
`[batch, *spatial, heads, head_dim]`; the built-in entries also take
`implementation=` (forces `full_attention`'s kernel). Layers, models, the
trainer, attention maps and the benchmark ask an entry what a name means
(`get_attention`) instead of testing the name.

Adding a variant is one `register_attention(name, AttentionVariant(fn, ...))`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax

from medgen_jax.attention.functional import (_num_spatial, _per_axis, axial_attention,
                                             full_attention, half_window_shift,
                                             window_attention)
from medgen_jax.attention.sequence_parallel import ALL_TO_ALL, RING, SequenceParallelForm

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AttentionVariant:
  """One attention variant: its function and what callers need to know about it.

  Attributes:
    fn: `fn(q, k, v, *, window_size, shift, bias, chunk_size)` over
      `[batch, *spatial, heads, head_dim]`.
    windowed: attends inside non-overlapping windows of `window_size`, which
      must tile the token grid (`check_window`), shifted by a per-axis `shift`.
    shifted: Swin alternation: `shift=None` means half a window, and a model's
      odd blocks shift by window // 2 (`block_shift`).
    accepts_bias: `fn` adds a `[heads, T, T]` relative position bias
      (T = prod(window)) to every window's logits; layers learn one.
    flat: attends over the row-major flattened grid, so it takes any number of
      spatial axes, and a layer given a `context` (cross-attention) may use it.
    sums_axes: the output is the sum of one attention per spatial axis (each
      weight row sums to the number of axes).
    sequence_parallel: how `fn` runs with a spatial axis sharded over the
      mesh's `seq` axis, or None where it has no such form.
  """
  fn: Callable[..., Array]
  windowed: bool = False
  shifted: bool = False
  accepts_bias: bool = False
  flat: bool = False
  sums_axes: bool = False
  sequence_parallel: SequenceParallelForm | None = None


def _full(q, k, v, *, window_size=None, shift=None, bias=None, chunk_size=None,
          implementation=None):
  """`full_attention` over the row-major flattened spatial axes."""
  del window_size, shift
  b, heads, dim = q.shape[0], q.shape[-2], q.shape[-1]
  flat = lambda x: x.reshape(b, -1, heads, dim)
  return full_attention(flat(q), flat(k), flat(v), bias=bias, chunk_size=chunk_size,
                        implementation=implementation).reshape(q.shape)


def _axial(q, k, v, *, window_size=None, shift=None, bias=None, chunk_size=None,
           implementation=None):
  """The sum of `axial_attention` along every spatial axis (row, column, depth line)."""
  del window_size, shift
  if bias is not None:
    raise ValueError("axial attention takes no bias")
  num = _num_spatial(q, "axial attention")
  outs = [axial_attention(q, k, v, axis=a, chunk_size=chunk_size,
                          implementation=implementation) for a in range(num)]
  return sum(outs[1:], outs[0])


def _window(shifted: bool) -> Callable[..., Array]:
  """`window_attention` whose `shift=None` is 0, or `half_window_shift` if `shifted`."""
  def attend(q, k, v, *, window_size=8, shift=None, bias=None, chunk_size=None,
             implementation=None):
    del chunk_size  # windows are small; blocking them buys nothing
    if shift is None:
      num = _num_spatial(q, "window attention")
      window = _per_axis(window_size, num, "window_size")
      shift = half_window_shift(window, q.shape[1:1 + num]) if shifted else 0
    return window_attention(q, k, v, window_size=window_size, shift=shift, bias=bias,
                            implementation=implementation)
  return attend


ATTENTION_VARIANTS: dict[str, AttentionVariant] = {
    "full": AttentionVariant(_full, flat=True, sequence_parallel=RING),
    "axial": AttentionVariant(_axial, sums_axes=True, sequence_parallel=ALL_TO_ALL),
    "window": AttentionVariant(_window(shifted=False), windowed=True, accepts_bias=True),
    "window_shifted": AttentionVariant(_window(shifted=True), windowed=True, shifted=True,
                                       accepts_bias=True),
}


def register_attention(name: str, variant: AttentionVariant) -> None:
  """Adds `variant` under `name`; a name already taken is a ValueError."""
  if name in ATTENTION_VARIANTS:
    raise ValueError(f"attention {name!r} is already registered")
  if not isinstance(variant, AttentionVariant):
    raise TypeError(f"register_attention({name!r}) needs an AttentionVariant; got "
                    f"{type(variant).__name__}")
  ATTENTION_VARIANTS[name] = variant


def get_attention(name: str, field: str = "attention") -> AttentionVariant:
  """The entry for `name`; an unknown name is one ValueError naming `field` and the valid names."""
  if name not in ATTENTION_VARIANTS:
    raise ValueError(f"unknown {field} {name!r}; valid names are {sorted(ATTENTION_VARIANTS)}")
  return ATTENTION_VARIANTS[name]


def check_window(attention: str, window_size: int | Sequence[int], grid: Sequence[int],
                 where: str = "") -> None:
  """Raises one ValueError unless a windowed variant's window tiles `grid`.

  Args:
    attention: variant name; variants that are not windowed always pass.
    window_size: int or one size per axis of `grid`.
    grid: the token grid's spatial sizes.
    where: appended to the message, e.g. ' of attention stage 1'.
  """
  if not get_attention(attention).windowed:
    return
  grid = tuple(int(g) for g in grid)
  window = _per_axis(window_size, len(grid), "window_size")
  if any(w < 1 for w in window):
    raise ValueError(f"attention={attention!r}: window_size={window_size} must be >= 1")
  if any(w > g or g % w for w, g in zip(window, grid)):
    raise ValueError(f"attention={attention!r}: window_size={window_size} must be <= "
                     f"and divide the token grid {grid}{where}")


def block_shift(attention: str, window_size: int, grid: Sequence[int], block: int) -> int:
  """Swin alternation: window // 2 on odd blocks of a shifted variant, else 0.

  Also 0 when the window covers the smallest axis of `grid` whole, where a
  shift has nothing to exchange across.
  """
  if get_attention(attention).shifted and block % 2 and window_size < min(grid):
    return window_size // 2
  return 0


def sequence_parallel_names() -> tuple[str, ...]:
  """Names of the variants that have a sequence-parallel form."""
  return tuple(n for n, v in ATTENTION_VARIANTS.items() if v.sequence_parallel is not None)


def sequence_parallel_form(attention: str) -> SequenceParallelForm:
  """The sequence-parallel form of `attention`; one ValueError if it has none."""
  form = get_attention(attention).sequence_parallel
  if form is None:
    raise ValueError(f"attention {attention!r} has no sequence-parallel form; variants "
                     f"that have one: {sequence_parallel_names()}")
  return form
