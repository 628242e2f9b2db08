"""orbax checkpoints of the full TrainState plus the data iterator position.

Each checkpoint step directory holds two items: 'state' (the TrainState:
both networks, EMA, both optimiser states, step, RNG) and 'data' (the grain
iterator state as JSON), so a resumed run sees exactly the batches an
uninterrupted run would. orbax writes into a temporary directory and renames
it when complete, so a process killed mid-save (even by SIGKILL) leaves the
previous checkpoints intact and the partial one is ignored.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  """Where a run in `workdir` keeps its checkpoints: `<workdir>/checkpoints`."""
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def latest_step(workdir: str) -> int | None:
  """Newest complete checkpoint step of the run in `workdir`, or None.

  orbax writes into a temporary directory and renames it to the bare step
  number when complete, so only all-digit names count. Reads the directory
  listing only: no manager, no devices.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return None
  steps = [int(d) for d in os.listdir(directory)
           if d.isdigit() and os.path.isdir(os.path.join(directory, d))]
  return max(steps) if steps else None


def require_checkpoint(workdir: str) -> int:
  """The latest checkpoint step, or a FileNotFoundError saying how to get one."""
  step = latest_step(workdir)
  if step is None:
    raise FileNotFoundError(
        f"no checkpoint in {checkpoint_dir(workdir)}; train first: python -m "
        f"experiments.train --config ... --workdir {workdir}")
  return step


def make_manager(directory: str, *, keep: int) -> ocp.CheckpointManager:
  """A manager keeping the newest `keep` checkpoints under `directory`.

  Saving is synchronous: the loop only continues once the checkpoint is
  complete, so "checkpoint at step k exists" means the step-k state is safe.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_state: dict | None) -> None:
  """Writes the TrainState and the iterator state for `step` (no-op if it exists)."""
  if step in manager.all_steps():
    return
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})),
      force=True)
  manager.wait_until_finished()


def abstract_with_sharding(abstract_state: Any, state_sharding: Any) -> Any:
  """ShapeDtypeStructs carrying the shardings the restored arrays should have."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, state_sharding)


def restore_latest(manager: ocp.CheckpointManager,
                   abstract_state: Any) -> tuple[Any, dict, int] | None:
  """(state, data iterator state, step) of the newest checkpoint, or None if there is none.

  Args:
    abstract_state: ShapeDtypeStruct tree (with shardings) of the TrainState.
  """
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"], step


def restore_fields(workdir: str, abstract_fields: dict[str, Any], *,
                   keep: int = 3) -> tuple[dict[str, Any], int]:
  """Named TrainState fields (e.g. 'ema_params', 'g_state') of the newest checkpoint.

  An orbax partial restore onto the first local device: only the requested
  fields are read, so inference never loads the discriminator or optimiser
  states.

  Args:
    workdir: the run's directory (its checkpoints are in `checkpoint_dir`).
    abstract_fields: field name -> pytree of ShapeDtypeStructs (e.g. from
      `jax.eval_shape` of the model's init).
    keep: passed to the manager (it never deletes on restore).

  Returns:
    (fields, step).

  Raises:
    FileNotFoundError: no (complete) checkpoint in the run.
    ValueError: a requested leaf is not in the checkpoint (another model).
  """
  directory = checkpoint_dir(workdir)
  require_checkpoint(workdir)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  manager = make_manager(directory, keep=keep)
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {directory}")
    restore_args = jax.tree.map(
        lambda _: ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=device),
        abstract_fields)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract_fields, restore_args=restore_args, partial_restore=True)))
  finally:
    manager.close()
  fields = {name: restored["state"][name] for name in abstract_fields}
  # A partial restore leaves leaves it cannot find as abstract structs.
  missing = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_flatten_with_path(fields)[0]
             if not isinstance(x, jax.Array)]
  if missing:
    raise ValueError(f"checkpoint step {step} in {directory} lacks {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''}: it was written by a different "
                     f"model (config.model or code version)")
  return fields, int(step)


@contextlib.contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
  """An Event set when SIGTERM arrives; the loop saves and exits at the next step.

  The handler only records the request: saving from inside a signal handler
  could interleave with a running step. Outside the main thread (where signal
  handlers cannot be installed) the event is never set.
  """
  flag = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)
