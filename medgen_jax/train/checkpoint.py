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
