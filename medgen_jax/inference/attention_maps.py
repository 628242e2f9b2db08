"""Attention maps of a generated image, in each layer's true geometry.

For one generated 2D image and one query pixel (y, x):

1. `capture` runs the generator once with `mutable=['intermediates']` (every
   `MultiHeadAttention` sows its projected q and k) and, through
   `nn.intercept_methods`, records each attention layer's variant, window and
   shift, its Swin relative bias, and the condition gates (`AttentionGate`)
   with the branch outputs they scale.
2. `attention_matrix` turns one layer's q/k into its full token-to-token
   weight matrix `[heads, N, N]` by running the layer's own attention variant
   (its registry entry's function, the code the forward pass ran) on identity
   values: output row n is then exactly the weight query n gave each key. So a
   'full' layer gives a dense row, 'axial' the query's row and column lines
   (the mean of the per-axis softmaxes: the layer sums their outputs),
   'window' the query's window, and 'window_shifted' the rolled window under
   the Swin region mask, already mapped back to unrolled image coordinates.
3. The query pixel is mapped to the layer's token grid
   (`token = pixel * grid // image`), the row is upsampled to image pixels
   (nearest: a token covers an `image / grid` block) and overlaid.
4. Rollout (Abnar & Zuidema 2020): with `A_l' = (A_l + I) / 2` (head mean,
   the residual path as identity), `R = A_L' U ... U A_1'`, where `U` maps a
   token of a finer stage to the coarser token it was upsampled from (pixel
   shuffle). The same product composes windowed and axial layers, whose
   matrices are sparse: for them the rollout is the composition of the
   per-layer maps over the token grid (how far information can travel in L
   layers), not a dense saliency. Shown over the first attention stage's grid.
5. Condition gate map: per block, `|gate_attn * attn(x)| + |gate_mlp * mlp(x)|`
   (L2 over channels) per token: where the adaLN-Zero gates, computed from
   the style vector (noise and condition embedding), let the residual
   updates through. Summed over blocks at image resolution.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure  # Agg canvas, no pyplot state

from medgen_jax import data as data_lib
from medgen_jax import viz
from medgen_jax.attention import Mlp, MultiHeadAttention, RelativePositionBias, get_attention
from medgen_jax.attention.layers import resolve_shift
from medgen_jax.conditioning import AttentionGate
from medgen_jax.inference import sample as sample_lib


@dataclasses.dataclass(frozen=True)
class LayerCapture:
  """One attention layer of one image.

  Attributes:
    path: module path, e.g. 'block_0_1/attention'.
    attention: variant name.
    window: per-axis window (windowed variants) or ().
    shift: per-axis shift (windowed variants) or ().
    q, k: `[*grid, heads, head_dim]` float32.
    bias: `[heads, T, T]` relative position bias (windowed) or None.
  """
  path: str
  attention: str
  window: tuple[int, ...]
  shift: tuple[int, ...]
  q: np.ndarray
  k: np.ndarray
  bias: np.ndarray | None

  @property
  def grid(self) -> tuple[int, ...]:
    return tuple(self.q.shape[:-2])


def _path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.scope.path)


def capture(generator: nn.Module, params: Any, z: jax.Array,
            conditions: Mapping[str, jax.Array]
            ) -> tuple[np.ndarray, list[LayerCapture], dict[str, np.ndarray]]:
  """Runs the generator on one sample and records what the maps need.

  Args:
    z: `[1, latent_dim]`; conditions: `{name: [1]}`.

  Returns:
    (image `[*spatial, C]` in [-1, 1], attention layers in forward order,
    gate maps `{block path: [*grid]}`).
  """
  if z.shape[0] != 1:
    raise ValueError(f"capture renders one image: z must be [1, latent], got {z.shape}")
  meta: dict[str, tuple] = {}

  def run(params, z, conditions):
    rec: dict[str, Any] = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      m = context.module
      if context.method_name != "__call__":
        return out
      if isinstance(m, MultiHeadAttention):
        nd = out.ndim - 2
        window, shift = (), ()
        if get_attention(m.attention).windowed:
          ws = m.window_size
          window = (ws,) * nd if isinstance(ws, int) else tuple(ws)
          shift = resolve_shift(m.attention, window, m.shift, grid=out.shape[1:-1])
        meta[_path(m)] = (m.attention, window, tuple(shift))
        rec[_path(m)] = out
      elif isinstance(m, (Mlp, RelativePositionBias)):
        rec[_path(m)] = out
      elif isinstance(m, AttentionGate):
        rec[_path(m)] = out[2]
      return out

    with nn.intercept_methods(interceptor):
      image, state = generator.apply({"params": params}, z, conditions, train=False,
                                     mutable=["intermediates"])
    return image, state["intermediates"], rec

  image, inter, rec = jax.jit(run)(params, z, conditions)
  image, inter, rec = jax.device_get((image, inter, rec))
  layers = []
  for path, (kind, window, shift) in meta.items():
    node = inter
    for part in path.split("/"):
      node = node[part]
    bias = rec.get(path + "/relative_bias")
    layers.append(LayerCapture(
        path=path, attention=kind, window=window, shift=shift,
        q=np.asarray(node["query"][0][0], np.float32),
        k=np.asarray(node["key"][0][0], np.float32),
        bias=None if bias is None else np.asarray(bias, np.float32)))
  gates = {}
  for path in meta:
    block = path.rsplit("/", 1)[0]
    total = 0.0
    for gate_name, branch in (("gate_attention", path), ("gate_mlp", block + "/mlp")):
      gate = rec.get(f"{block}/{gate_name}")
      if gate is not None and branch in rec:
        total = total + np.linalg.norm(gate[0] * rec[branch][0], axis=-1)
    if not isinstance(total, float):
      gates[block] = np.asarray(total, np.float32)
  return np.asarray(image[0]), layers, gates


def attention_matrix(q: np.ndarray, k: np.ndarray, *, attention: str,
                     window: Sequence[int] = (), shift: Sequence[int] = (),
                     bias: np.ndarray | None = None) -> np.ndarray:
  """Token-to-token weights `[heads, N, N]` (N = prod(grid), row-major) of one layer.

  Args:
    q, k: `[*grid, heads, head_dim]` (2 or 3 grid axes; 'full' any).
    attention: a key of `ATTENTION_VARIANTS`.
    window, shift: per-axis window and shift of the windowed variants.
    bias: `[heads, T, T]` relative position bias of the variants that accept one.

  Returns:
    float32 weights; row n is what query token n gave every key. Rows sum to
    1 (a variant that sums per-axis attentions, 'axial': the mean over axes
    of the per-line softmaxes).
  """
  variant = get_attention(attention)
  if q.shape != k.shape or q.ndim < 3:
    raise ValueError(f"q and k must both be [*grid, heads, head_dim]; got {q.shape}, {k.shape}")
  grid, (heads, dim) = q.shape[:-2], q.shape[-2:]
  n = math.prod(grid)
  kwargs = {}
  if variant.windowed:
    kwargs = dict(window_size=tuple(window), shift=tuple(shift))
  if variant.accepts_bias:
    kwargs["bias"] = None if bias is None else jnp.asarray(bias)
  fn = jax.jit(lambda q, k, v: variant.fn(q, k, v, **kwargs))
  qb, kb = jnp.asarray(q)[None], jnp.asarray(k)[None]
  # Attention is linear in v: identity values (head_dim columns at a time)
  # read the weight matrix out of the layer's own implementation.
  cols = []
  for start in range(0, n, dim):
    eye = np.zeros((n, dim), np.float32)
    idx = np.arange(start, min(start + dim, n))
    eye[idx, idx - start] = 1.0
    v = jnp.broadcast_to(jnp.asarray(eye).reshape(*grid, 1, dim), (1, *grid, heads, dim))
    out = np.asarray(fn(qb, kb, v))[0].reshape(n, heads, dim)
    cols.append(out[:, :, :len(idx)])
  weights = np.concatenate(cols, axis=-1).transpose(1, 0, 2)  # [heads, N, N]
  if variant.sums_axes:
    weights = weights / len(grid)
  return weights


def query_token(query: Sequence[int], image_shape: Sequence[int],
                grid: Sequence[int]) -> tuple[int, ...]:
  """Image pixel -> the token of `grid` that covers it (`pixel * grid // image`)."""
  if len(query) != len(image_shape) or len(grid) != len(image_shape):
    raise ValueError(f"query {tuple(query)} needs one coordinate per image axis "
                     f"{tuple(image_shape)}")
  for q, s in zip(query, image_shape):
    if not 0 <= q < s:
      raise ValueError(f"query {tuple(query)} is outside the image {tuple(image_shape)}")
  return tuple(int(q) * int(g) // int(s) for q, s, g in zip(query, image_shape, grid))


def upsample(token_map: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
  """`[*grid]` -> `[*image_shape]`, each token filling its block (nearest)."""
  out = np.asarray(token_map)
  for axis, (g, s) in enumerate(zip(out.shape, image_shape)):
    if s % g:
      raise ValueError(f"image {tuple(image_shape)} is not a multiple of grid {out.shape}")
    out = np.repeat(out, s // g, axis=axis)
  return out


def transfer_matrix(fine: Sequence[int], coarse: Sequence[int]) -> np.ndarray:
  """`[N_fine, N_coarse]`: fine token p came from coarse token p * coarse // fine."""
  idx = np.indices(tuple(fine)).reshape(len(fine), -1)
  parent = [i * c // f for i, c, f in zip(idx, coarse, fine)]
  flat = np.ravel_multi_index(parent, tuple(coarse))
  u = np.zeros((idx.shape[1], math.prod(coarse)), np.float32)
  u[np.arange(idx.shape[1]), flat] = 1.0
  return u


def rollout(matrices: Sequence[np.ndarray], grids: Sequence[Sequence[int]]) -> np.ndarray:
  """Attention rollout `[N_last, N_first]` of head-averaged `[N_l, N_l]` matrices."""
  result = None
  prev_grid = None
  for a, grid in zip(matrices, grids):
    step = 0.5 * a + 0.5 * np.eye(a.shape[0], dtype=np.float32)
    if result is None:
      result = step
    else:
      if tuple(grid) != tuple(prev_grid):
        result = transfer_matrix(grid, prev_grid) @ result
      result = step @ result
    prev_grid = grid
  return result


def _overlay(display: np.ndarray, heat: np.ndarray, path: str, *, title: str,
             query: Sequence[int]) -> None:
  fig = Figure(figsize=(4, 4))
  ax = fig.subplots()
  ax.imshow(display, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
  peak = float(heat.max())
  shown = np.ma.masked_where(heat <= 0, heat / peak if peak > 0 else heat)
  im = ax.imshow(shown, cmap="inferno", alpha=0.55, vmin=0.0, vmax=1.0,
                 interpolation="nearest")
  ax.plot([query[1]], [query[0]], marker="+", color="cyan", markersize=12, mew=2)
  ax.set_title(title, fontsize=8)
  ax.set_xticks([])
  ax.set_yticks([])
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="relative weight")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def attention_maps(config: Any, workdir: str, *, query: Sequence[int], out_dir: str,
                   seed: int = 0, condition: str | None = None) -> dict[str, Any]:
  """Renders one generated image's attention maps under `out_dir`.

  Writes `layer_XX_<path>.png` (one per attention layer), `rollout.png`,
  `condition_gate.png` and `attention_maps.json` (files, token grids, each
  layer's query token and argmax key in image pixels).

  Raises:
    ValueError: query outside the image, a 3D dataset, a generator without
      attention, or a bad condition (all before the model is loaded).
  """
  info = data_lib.load_info(config.data)
  spatial = tuple(info.spatial_shape)
  if len(spatial) != 2:
    raise ValueError(f"attention maps are rendered for 2D images; dataset {info.name!r} "
                     f"has spatial shape {spatial}")
  query = tuple(int(v) for v in query)
  query_token(query, spatial, spatial)  # range check
  if config.model.generator != "transformer":
    raise ValueError(f"generator {config.model.generator!r} has no attention layers")
  requested = sample_lib.parse_condition_string(condition, info)
  conditions = sample_lib.build_conditions(requested, info, 1, seed=seed)
  generator, params, step = sample_lib.restore_ema_generator(config, workdir, info)
  z = sample_lib.make_noise(seed, 1, int(config.model.latent_dim))
  image, layers, gates = capture(generator, params, jnp.asarray(z),
                                 {k: jnp.asarray(v) for k, v in conditions.items()})
  display = viz.to_display(image[None], info)[0][:, :spatial[1]]  # first channel
  os.makedirs(out_dir, exist_ok=True)
  report = dict(query=list(query), checkpoint_step=step, seed=seed,
                conditions={k: np.asarray(v).tolist() for k, v in conditions.items()},
                layers=[])
  matrices = []
  for i, layer in enumerate(layers):
    a = attention_matrix(layer.q, layer.k, attention=layer.attention, window=layer.window,
                         shift=layer.shift, bias=layer.bias).mean(0)
    matrices.append(a)
    token = query_token(query, spatial, layer.grid)
    row = a[np.ravel_multi_index(token, layer.grid)].reshape(layer.grid)
    heat = upsample(row, spatial)
    name = f"layer_{i:02d}_{layer.path.replace('/', '_')}.png"
    _overlay(display, heat, os.path.join(out_dir, name), query=query,
             title=f"{layer.path}: {layer.attention} {layer.grid}"
                   + (f"\nwindow {layer.window} shift {layer.shift}" if layer.window else ""))
    peak = np.unravel_index(int(np.argmax(row)), layer.grid)
    report["layers"].append(dict(
        path=layer.path, attention=layer.attention, grid=list(layer.grid),
        window=list(layer.window), shift=list(layer.shift), query_token=list(token),
        argmax_token=[int(p) for p in peak], support_tokens=int((row > 0).sum()), file=name))
  if layers:
    r = rollout(matrices, [l.grid for l in layers])
    last = layers[-1].grid
    row = r[np.ravel_multi_index(query_token(query, spatial, last), last)]
    heat = upsample(row.reshape(layers[0].grid), spatial)
    _overlay(display, heat, os.path.join(out_dir, "rollout.png"), query=query,
             title=f"rollout over {len(layers)} layers")
    report["rollout"] = "rollout.png"
  if gates:
    heat = sum(upsample(g, spatial) for g in gates.values())
    _overlay(display, heat, os.path.join(out_dir, "condition_gate.png"), query=query,
             title="condition gate |gate * branch|, summed over blocks")
    report["condition_gate"] = "condition_gate.png"
    peak = np.unravel_index(int(np.argmax(heat)), spatial)
    report["condition_gate_peak_pixel"] = [int(p) for p in peak]
  with open(os.path.join(out_dir, "attention_maps.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report
