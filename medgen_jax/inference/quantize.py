"""Generator precisions for inference: fp32, bf16 and int8 (qwix PTQ).

- fp32: the trained EMA params as they are.
- bf16: params cast to bfloat16 and the generator rebuilt with compute dtype
  bfloat16 (the image is returned as float32).
- int8: qwix post-training quantization. Every matmul/einsum weight is stored
  as int8 with one float32 scale per output channel (absmax); convolutions
  too, but qwix's PTQ convolution requires activations of the same type, so
  convolution inputs are quantized to int8 on the fly (dynamic absmax). The
  two products inside attention (q.k and p.v) multiply activations by
  activations and stay in float. Parameters that are not matmul operands but
  are large tables (learned position embeddings, condition embeddings) are
  stored int8 per channel too and dequantized inside the jitted function.
  With `activations=True` every matmul input is also int8 with a static
  scale, calibrated with qwix's QAT statistics over a few batches.

`prepare` returns a `PreparedGenerator`: a pure `apply(params, z, conditions)`
plus the params as stored, so `param_bytes` counts what actually sits in
memory (int8 values and their scales). The precision table (end to end, from
a checkpoint, with the domain extractor's scores) is
`medgen_jax.studies.precision.compare_precisions`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from medgen_jax.data.info import uniform_conditions

PRECISIONS = ("fp32", "bf16", "int8")
# Float leaves left by qwix with at least this many elements are stored int8.
_TABLE_MIN_SIZE = 256


@dataclasses.dataclass(frozen=True)
class PreparedGenerator:
  """A generator ready for inference at one precision.

  Attributes:
    precision: 'fp32' | 'bf16' | 'int8' (or e.g. 'int2' for experiments).
    apply: pure `(params, z [B, latent], conditions) -> [B, *spatial, C]`
      float32 images in [-1, 1]; jit it.
    params: the stored parameters (what `param_bytes` measures).
  """
  precision: str
  apply: Callable[..., jax.Array]
  params: Any


def param_bytes(params: Any) -> int:
  """Bytes of every array leaf (int8 values, scales, float params)."""
  return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape)
                 for x in jax.tree.leaves(params)))


def _is_qarray(x) -> bool:
  return isinstance(x, qwix.QArray)


def quantized_weight_bytes(params: Any) -> tuple[int, int]:
  """(stored bytes, float32 bytes) of the quantized leaves only (values + scales)."""
  stored, fp32 = 0, 0
  for leaf in jax.tree.leaves(params, is_leaf=_is_qarray):
    if _is_qarray(leaf):
      stored += param_bytes(leaf)
      fp32 += 4 * math.prod(leaf.qvalue.shape)
  return stored, fp32


def _apply_fn(generator) -> Callable[..., jax.Array]:
  def apply(params, z, conditions):
    out = generator.apply({"params": params}, z, conditions, train=False)
    return out.astype(jnp.float32)
  return apply


def int8_rules(*, qtype: str = "int8", activations: bool = False,
               rule_cls=qwix.QuantizationRule) -> list:
  """qwix rules, first match wins.

  Args:
    qtype: weight type of matmuls ('int8'; 'int4'/'int2' to see damage).
      Convolutions always use int8 (XLA:CPU has no sub-byte convolutions).
    activations: int8 matmul inputs with static (calibrated) scales.
    rule_cls: `qwix.QuantizationRule` (PTQ) or `qwix.QtRule` (calibration).
  """
  act = dict(act_qtype="int8", act_static_scale=True) if activations else {}
  return [
      # Inside MultiHeadAttention itself the products are activation x
      # activation (q.k, p.v): no weight to quantize, keep them float.
      rule_cls(module_path=".*/attention"),
      rule_cls(module_path=".*", op_names=("conv_general_dilated",),
               weight_qtype="int8", act_qtype="int8"),
      rule_cls(module_path=".*", weight_qtype=qtype, **act),
  ]


def _quantize_tables(params: Any) -> Any:
  """Large float leaves qwix left alone -> int8 QArray.

  Tables (position / condition embeddings) get one scale per last-axis
  channel, long vectors (the stem's bias over the whole token grid) one scale.
  """
  def one(x):
    if not isinstance(x, jax.Array) or x.size < _TABLE_MIN_SIZE:
      return x
    return qwix.quantize(x, "int8", channelwise_axes=[x.ndim - 1] if x.ndim > 1 else [])
  return jax.tree.map(one, params, is_leaf=lambda x: _is_qarray(x) or _is_withaux(x))


def _dequantize_tables(params: Any) -> Any:
  """Inverse of `_quantize_tables`, leaving qwix's WithAux weights quantized."""
  def one(x):
    return qwix.dequantize(x) if _is_qarray(x) else x
  return jax.tree.map(one, params, is_leaf=lambda x: _is_qarray(x) or _is_withaux(x))


def _is_withaux(x) -> bool:
  return type(x).__name__ == "WithAux"


def _unwrap(tree: Any) -> Any:
  """WithAux(QArray) leaves -> QArray, for byte counting."""
  return jax.tree.map(lambda x: x.array if _is_withaux(x) else x, tree,
                      is_leaf=_is_withaux)


def _calibrate(generator, params, rules_kwargs, calibration) -> Any:
  """qwix QAT statistics (absmax running means) of matmul inputs over batches."""
  qt = qwix.quantize_model(generator, qwix.QtProvider(
      int8_rules(rule_cls=qwix.QtRule, **rules_kwargs)))
  z0, c0 = calibration[0]
  stats = jax.eval_shape(lambda: qt.init(jax.random.key(0), z0, c0, train=False))
  stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats["quant_stats"])
  update = jax.jit(lambda s, z, c: qt.apply(
      {"params": params, "quant_stats": s}, z, c, train=False,
      mutable=["quant_stats"])[1]["quant_stats"])
  for z, c in calibration:
    stats = update(stats, z, c)
  return stats


def prepare(generator, params: Any, precision: str, *, example_z: jax.Array,
            example_conditions: Mapping[str, jax.Array], activations: bool = False,
            calibration: list | None = None) -> PreparedGenerator:
  """The generator and params at `precision`.

  Args:
    generator: the float32 linen generator.
    params: its float32 'params'.
    precision: 'fp32' | 'bf16' | 'int8'; 'int4' / 'int2' quantize matmul
      weights to fewer bits (to show what broken quantization looks like).
    example_z, example_conditions: inputs of the batch shape to be used
      (abstract init of the quantized model; nothing is computed on them).
    activations: int8 only: static int8 matmul activations.
    calibration: list of (z, conditions) batches for `activations=True`.

  Raises:
    ValueError: unknown precision, or activations without calibration batches.
  """
  if precision == "fp32":
    return PreparedGenerator("fp32", _apply_fn(generator), params)
  if precision == "bf16":
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return PreparedGenerator("bf16", _apply_fn(generator.clone(dtype=jnp.bfloat16)), cast)
  if precision not in ("int8", "int4", "int2"):
    raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
  if activations and not calibration:
    raise ValueError("int8 activations need calibration batches (static ranges)")
  rules_kwargs = dict(qtype=precision, activations=activations)
  ptq = qwix.quantize_model(generator, qwix.PtqProvider(int8_rules(**rules_kwargs)))
  abstract = jax.eval_shape(lambda: ptq.init(
      jax.random.key(0), example_z, example_conditions, train=False))["params"]
  # numpy, so that qwix's Python checks on the statistics stay concrete under jit.
  stats = (jax.tree.map(np.asarray, _calibrate(generator, params, rules_kwargs, calibration))
           if activations else flax.core.FrozenDict())
  # One compiled program instead of hundreds of small eager quantize ops; the
  # calibration statistics stay concrete (qwix checks their counts in Python).
  stored = jax.jit(lambda p: _quantize_tables(qwix.quantize_params(p, abstract, stats)))(
      params)

  def apply(p, z, conditions):
    out = ptq.apply({"params": _dequantize_tables(p)}, z, conditions, train=False)
    return out.astype(jnp.float32)

  name = precision + ("_a8" if activations else "")
  return PreparedGenerator(name, apply, stored)


def stored_bytes(prepared: PreparedGenerator) -> dict[str, int]:
  """param_bytes (everything stored), quantized_bytes and their fp32 size."""
  tree = _unwrap(prepared.params)
  q, q32 = quantized_weight_bytes(tree)
  return {"param_bytes": param_bytes(tree), "quantized_bytes": q,
          "quantized_fp32_bytes": q32}


def psnr(x: np.ndarray, reference: np.ndarray, *, data_range: float = 2.0) -> float:
  """PSNR (dB) of `x` against `reference`, both model range [-1, 1] (range 2)."""
  mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(reference, np.float64)) ** 2))
  return float("inf") if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def prepare_for_sampling(generator, params, precision: str, *, info, batch_size: int,
                         latent_dim: int, calibration_batches: int = 0,
                         seed: int = 0) -> PreparedGenerator:
  """`prepare` with example inputs of the sampling batch shape.

  `calibration_batches` > 0 with 'int8' turns on static int8 activations,
  calibrated on that many batches of fresh noise and uniform conditions.
  """
  z = jnp.zeros((batch_size, latent_dim), jnp.float32)
  rng = np.random.default_rng(seed + 1)
  cond = {k: jnp.asarray(v) for k, v in uniform_conditions(info, rng, batch_size).items()}
  calibration = None
  if calibration_batches > 0:
    calibration = [
        (jax.random.normal(jax.random.key(seed + 100 + i), z.shape),
         {k: jnp.asarray(v) for k, v in uniform_conditions(info, rng, batch_size).items()})
        for i in range(calibration_batches)]
  return prepare(generator, params, precision, example_z=z, example_conditions=cond,
                 activations=calibration_batches > 0 and precision.startswith("int"),
                 calibration=calibration)
