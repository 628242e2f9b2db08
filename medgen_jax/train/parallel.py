"""Device layout: mesh, shardings and the jit / pmap / shard_map wrappers.

This is the only module that knows about parallel modes. Every mode wraps the
same pure step function (the task's, its settings bound by
`step.trainer_hooks`); the `Trainer` it returns hides the differences (state placement, batch layout, reading the state back) from the loop:

- 'jit': state replicated as `NamedSharding(mesh, P())`, batch sharded on the
  'data' mesh axis via the logical axis rules; XLA inserts the all-reduces.
- 'pmap': state stacked on a leading device axis, batch reshaped to
  `[devices, per_device, ...]`, `axis_name='data'`, explicit `lax.pmean`.
- 'shard_map': `jax.shard_map` over the mesh with `P('data')` batch and `P()`
  state, explicit `lax.pmean` over 'data'.

The state is replicated. With `mesh.seq > 1` ('jit' only) the transformer
generator runs sequence parallel: the trainer hands it a `SequenceSharding`
built from `parallel.logical_axis_rules` (e.g. ('depth', 'seq')), so its
attention-stage token grids are sharded over 'seq' along depth and attention
exchanges tokens with a ring or all-to-all (docs/scaling.md). `validate`
rejects layouts that cannot work before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medgen_jax.attention import registry
from medgen_jax.attention import sequence_parallel as sp
from medgen_jax.data.info import DatasetInfo
from medgen_jax.models import shapes, variants
from medgen_jax.train import state as state_lib

PARALLEL_MODES = ("jit", "pmap", "shard_map")
MESH_AXES = ("data", "seq")
DATA_AXIS = "data"
SEQ_AXIS = "seq"


def maybe_initialize_distributed(parallel_config: Any) -> None:
  """jax.distributed.initialize() when config.parallel.distributed (before any device use)."""
  if not parallel_config.distributed:
    return
  # CPU collectives across processes need gloo; ignored by GPU/TPU backends.
  # (Asking for the backend here would initialise it too early.)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if parallel_config.get("coordinator_address"):
    kwargs = dict(coordinator_address=parallel_config.coordinator_address,
                  num_processes=parallel_config.num_processes,
                  process_id=parallel_config.process_id)
  jax.distributed.initialize(**kwargs)  # no args: auto-detect on TPU pods / SLURM


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves -1 (all remaining devices) and checks the product equals num_devices."""
  unknown = sorted(set(mesh_config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"parallel.mesh has unknown axes {unknown}; expected {MESH_AXES}")
  shape = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}
  rest = [a for a, n in shape.items() if n == -1]
  if len(rest) > 1:
    raise ValueError(f"parallel.mesh: at most one axis may be -1, got {shape}")
  known = math.prod(n for n in shape.values() if n != -1)
  if rest:
    if known <= 0 or num_devices % known:
      raise ValueError(f"parallel.mesh {shape}: {num_devices} devices cannot be split "
                       f"with fixed axes of product {known}")
    shape[rest[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f"parallel.mesh {shape}: product of mesh axes "
                     f"{math.prod(shape.values())} != device count {num_devices}")
  return shape


def validate(parallel_config: Any, global_batch: int, num_devices: int, *,
             model_config: Any = None,
             spatial_shape: tuple[int, ...] | None = None) -> dict[str, int]:
  """All parallel checks, before anything is compiled; returns the mesh shape.

  With `model_config` and `spatial_shape` (as `build_trainer` passes them) a
  `mesh.seq > 1` layout is also checked against the generator's token grids.
  """
  mode = parallel_config.mode
  if mode not in PARALLEL_MODES:
    raise ValueError(f"unknown parallel.mode {mode!r}; expected one of {PARALLEL_MODES}")
  shape = mesh_shape(parallel_config.mesh, num_devices)
  if mode == "pmap" and shape[SEQ_AXIS] != 1:
    raise ValueError(f"parallel.mode 'pmap' is data parallel only: mesh.seq must be 1, "
                     f"got {shape[SEQ_AXIS]}")
  if shape[SEQ_AXIS] > 1:
    _validate_sequence_parallel(parallel_config, shape[SEQ_AXIS], model_config, spatial_shape)
  if global_batch % shape[DATA_AXIS]:
    raise ValueError(f"train.batch_size {global_batch} is not divisible by the "
                     f"{shape[DATA_AXIS]} devices on the 'data' mesh axis")
  if global_batch % jax.process_count():
    raise ValueError(f"train.batch_size {global_batch} is not divisible by the "
                     f"{jax.process_count()} processes")
  return shape


def logical_axis_rules(parallel_config: Any) -> tuple[tuple[str, str | None], ...]:
  """config.parallel.logical_axis_rules as a tuple of pairs (default: batch -> data)."""
  return tuple(tuple(r) for r in parallel_config.get("logical_axis_rules",
                                                     (("batch", DATA_AXIS),)))


def _validate_sequence_parallel(parallel_config: Any, seq: int, model_config: Any,
                                spatial_shape: tuple[int, ...] | None) -> None:
  """Why a mesh.seq > 1 layout cannot run, as one ValueError naming the field."""
  if parallel_config.mode != "jit":
    raise ValueError(f"parallel.mesh.seq={seq} needs parallel.mode 'jit' (the generator's "
                     f"attention shard_maps over 'seq' inside the jitted step); got "
                     f"{parallel_config.mode!r}")
  rules = logical_axis_rules(parallel_config)
  names = sp.SPATIAL_NAMES[len(spatial_shape)] if spatial_shape else ("depth", "height")
  to_seq = [n for n in names if nn.logical_to_mesh_axes((n,), rules)[0] == SEQ_AXIS]
  if len(to_seq) != 1:
    raise ValueError(f"parallel.mesh.seq={seq} needs parallel.logical_axis_rules to map "
                     f"exactly one of the token grid axes {names} to 'seq', e.g. "
                     f"('{names[0]}', 'seq'); got {rules}")
  if model_config is None or spatial_shape is None:
    return
  generator = model_config.generator
  if generator != "transformer":
    raise ValueError(f"parallel.mesh.seq={seq} shards the transformer generator's "
                     f"attention stages; model.generator={generator!r} has none")
  attention = model_config.attention
  form = registry.get_attention(attention, "model.attention").sequence_parallel
  if form is None:
    raise ValueError(f"parallel.mesh.seq={seq} supports model.attention in "
                     f"{registry.sequence_parallel_names()}; got {attention!r}, which has "
                     f"no sequence-parallel form (windows would need halo exchange across "
                     f"the depth shards)")
  sharded = names.index(to_seq[0])
  if form.contiguous_blocks and sharded != 0:
    raise ValueError(f"parallel.logical_axis_rules: {attention} ({form.name}) attention needs "
                     f"the first axis {names[0]!r} on 'seq', not {to_seq[0]!r}")
  grid, num_up = shapes.upsampling_plan(spatial_shape, int(model_config.token_grid))
  variant = variants.decode_variant(model_config.variant)
  stages = min(int(model_config.attention_stages), num_up + 1, len(variant.depth))
  chunk = model_config.get("chunk_size")
  for stage, stage_grid in enumerate(shapes.stage_grids(grid, num_up)[:stages]):
    where = f"attention stage {stage} token grid {stage_grid}"
    if stage_grid[sharded] % seq:
      raise ValueError(f"parallel.mesh.seq={seq}: {where} has {to_seq[0]} "
                       f"{stage_grid[sharded]}, not divisible by seq")
    local = list(stage_grid)
    local[sharded] //= seq
    heads = variant.num_heads[stage]
    if form.regroups_heads and heads % seq and not any(
        n % seq == 0 for a, n in enumerate(local) if a != sharded):
      raise ValueError(f"parallel.mesh.seq={seq}: the {form.name} of {attention} attention "
                       f"needs the heads ({heads}, model.variant) or another axis of the "
                       f"local grid {tuple(local)} of {where} divisible by seq")
    if form.contiguous_blocks and chunk is not None and (
        not isinstance(chunk, int) or math.prod(local) % chunk):
      raise ValueError(f"model.chunk_size={chunk} must divide the {math.prod(local)} "
                       f"local tokens of {where} for {form.name} attention over seq={seq}")


def make_mesh(parallel_config: Any, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(parallel_config.mesh, len(devices))
  grid = np.asarray(devices).reshape([shape[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES)


def batch_partition_spec(parallel_config: Any) -> P:
  """The batch's PartitionSpec from the logical axis rules ('batch' -> 'data')."""
  return nn.logical_to_mesh_axes(("batch",), logical_axis_rules(parallel_config))


def sequence_parallel_models(models: state_lib.Models, mesh: Mesh,
                             parallel_config: Any) -> state_lib.Models:
  """`models` with the generator sharded over the mesh's 'seq' axis (unchanged if seq == 1).

  Only the train step uses the returned generator; parameters are the same,
  so init, checkpoints and sampling keep the original module.
  """
  if mesh.shape[SEQ_AXIS] == 1:
    return models
  if "sequence_sharding" not in getattr(models.generator, "__dataclass_fields__", {}):
    raise ValueError(f"parallel.mesh.seq={mesh.shape[SEQ_AXIS]}: generator "
                     f"{type(models.generator).__name__} does not support sequence "
                     f"parallelism (only TransformerGenerator)")
  layout = sp.SequenceSharding(mesh, logical_axis_rules(parallel_config), SEQ_AXIS)
  return models._replace(generator=models.generator.clone(sequence_sharding=layout))


@dataclasses.dataclass(frozen=True)
class Trainer:
  """A train step bound to a device layout.

  Attributes:
    mode: 'jit' | 'pmap' | 'shard_map'.
    mesh: the device mesh.
    init_state: () -> placed TrainState.
    step: (placed state, placed batch, *, with_r1: bool) -> (placed state,
      metrics of scalars); one executable per `with_r1`, compiled on first use
      (a static switch instead of `lax.cond`: see `step.train_step`).
    put_batch: process-local host batch (dict of `[local_batch, ...]` arrays) -> placed batch.
    put_state: global TrainState (e.g. restored) -> placed state.
    get_state: placed state -> global TrainState (for checkpoints and sampling).
    state_sharding: NamedSharding tree for a global TrainState (restore target).
    abstract_state: ShapeDtypeStruct tree of the TrainState.
  """
  mode: str
  mesh: Mesh
  init_state: Callable[[], Any]
  step: Callable[[Any, Any], tuple[Any, dict]]
  put_batch: Callable[[Mapping[str, np.ndarray]], Any]
  put_state: Callable[[Any], Any]
  get_state: Callable[[Any], Any]
  state_sharding: Any
  abstract_state: Any


def build_trainer(parallel_config: Any, models: state_lib.Models, info: DatasetInfo,
                  devices=None, *, global_batch: int, model_config: Any,
                  step_fn: Callable, init_fn: Callable[[], Any]) -> Trainer:
  """Mesh + shardings + the wrapped train step for `parallel_config.mode`.

  Args:
    parallel_config: the `config.parallel` section.
    models: networks and optimisers.
    info: the dataset's DatasetInfo.
    devices: the mesh's devices (default: all).
    global_batch: `train.batch_size`, checked against the mesh.
    model_config: the `config.model` section (read by the sequence-parallel checks).
    step_fn: `(state, batch, rng, *, models, axis_name, with_r1) -> (state,
      metrics)` with its settings bound (`step.trainer_hooks`,
      `flow.trainer_hooks`, `translation.trainer_hooks`).
    init_fn: pure `() -> state`.
  """
  pcfg = parallel_config
  devices = jax.devices() if devices is None else devices
  validate(pcfg, global_batch, len(devices), model_config=model_config,
           spatial_shape=tuple(info.spatial_shape))
  mesh = make_mesh(pcfg, devices)
  init = init_fn
  # Shapes first, then shardings, then a jitted init that lays the state out.
  abstract = jax.eval_shape(init)
  replicated = NamedSharding(mesh, P())
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  init_placed = jax.jit(init, out_shardings=state_sharding)
  step = functools.partial(step_fn, models=sequence_parallel_models(models, mesh, pcfg))
  batch_sharding = NamedSharding(mesh, batch_partition_spec(pcfg))

  def put_global_batch(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  def put_state_named(state):
    return jax.device_put(state, state_sharding)

  if pcfg.mode == "jit":
    def compile_jit(with_r1):
      return jax.jit(lambda s, b: step(s, b, None, axis_name=None, with_r1=with_r1),
                     in_shardings=(state_sharding, batch_sharding),
                     out_shardings=(state_sharding, replicated), donate_argnums=0)
    return Trainer("jit", mesh, init_placed, _per_r1(compile_jit), put_global_batch,
                   put_state_named, lambda s: s, state_sharding, abstract)

  if pcfg.mode == "shard_map":
    # check_vma=False: with varying-axis tracking on, AD would already psum the
    # gradients of the replicated params, and the step's explicit pmean (shared
    # with pmap) would then be applied to a sum: 8x too large gradients.
    def compile_shard_map(with_r1):
      mapped = jax.shard_map(
          lambda s, b: step(s, b, None, axis_name=DATA_AXIS, with_r1=with_r1), mesh=mesh,
          in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()), check_vma=False)
      return jax.jit(mapped, donate_argnums=0)
    return Trainer("shard_map", mesh, init_placed, _per_r1(compile_shard_map),
                   put_global_batch, put_state_named, lambda s: s, state_sharding, abstract)

  # pmap: one replica per local device; pmean spans all processes' devices.
  local = jax.local_devices()
  n_local = len(local)

  def compile_pmap(with_r1):
    return jax.pmap(lambda s, b: step(s, b, None, axis_name=DATA_AXIS, with_r1=with_r1),
                    axis_name=DATA_AXIS, devices=local if jax.process_count() == 1 else None,
                    donate_argnums=0)
  pmapped = _per_r1(compile_pmap)

  def put_state_pmap(state):
    host = jax.device_get(state)
    return jax.tree.map(lambda x: _replicate(x, local), host)

  def put_batch_pmap(batch):
    return {k: np.asarray(v).reshape((n_local, -1) + np.shape(v)[1:]) for k, v in batch.items()}

  def step_pmap(pstate, pbatch, *, with_r1):
    pstate, metrics = pmapped(pstate, pbatch, with_r1=with_r1)
    return pstate, jax.tree.map(lambda m: m[0], metrics)

  def get_state_pmap(pstate):
    return jax.device_put(jax.tree.map(lambda x: x[0], pstate), state_sharding)

  return Trainer("pmap", mesh, lambda: put_state_pmap(init_placed()), step_pmap,
                 put_batch_pmap, put_state_pmap, get_state_pmap, state_sharding, abstract)


def _per_r1(compile_fn: Callable[[bool], Callable]) -> Callable:
  """step(state, batch, *, with_r1) over one wrapped executable per R1 setting."""
  compiled = {}

  def step(state, batch, *, with_r1: bool):
    if with_r1 not in compiled:
      compiled[with_r1] = compile_fn(bool(with_r1))
    return compiled[with_r1](state, batch)
  return step


def _replicate(x: np.ndarray, devices) -> jax.Array:
  """A pmap-ready array: x stacked once per device, slice i on device i."""
  x = np.asarray(x)
  sharding = NamedSharding(Mesh(np.asarray(devices), ("replica",)), P("replica"))
  return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape), sharding)
