"""orbax checkpoints of the full TrainState plus the data iterator position.

Each checkpoint step directory holds two items: 'state' (the TrainState:
both networks, EMA, both optimiser states, step, RNG) and 'data' (the grain
iterator state as JSON), so a resumed run sees exactly the batches an
uninterrupted run would. orbax writes into a temporary directory and renames
it when complete, so a process killed mid-save (even by SIGKILL) leaves the
previous checkpoints intact and the partial one is ignored.

What real runs meet:
- a damaged newest checkpoint (a file truncated by a full disk or a bad
  copy): `restore_latest` falls back to the newest one that restores, moves
  the damaged one to `<workdir>/checkpoints_damaged/` and logs both steps;
- the disk filling while saving: `save` raises `CheckpointSaveError` naming
  the step that is still intact and removes its own partial directory;
- two runs on one workdir: `workdir_lock` keeps a lock file naming the
  holder's pid, refuses a second process and replaces a lock whose process
  is gone.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("medgen_jax.train")
LOCK_NAME = "train.lock"
DAMAGED_DIR = "checkpoints_damaged"


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock."""


class CheckpointSaveError(OSError):
  """Writing a checkpoint failed (e.g. no space left); earlier ones are intact."""


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
  """Writes the TrainState and the iterator state for `step` (no-op if it exists).

  Raises:
    CheckpointSaveError: the write failed (its errno kept, e.g. ENOSPC). The
      partial directory of `step` is removed; the older checkpoints are
      untouched (orbax deletes old ones only after a save has completed).
  """
  if step in manager.all_steps():
    return
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})),
        force=True)
    manager.wait_until_finished()
  except OSError as e:
    directory = str(manager.directory)
    for partial in glob.glob(os.path.join(directory, f"{step}.*")) + [
        os.path.join(directory, str(step))]:
      shutil.rmtree(partial, ignore_errors=True)
    intact = [int(d) for d in os.listdir(directory) if d.isdigit()]
    hint = ("the disk is full; free space" if e.errno == errno.ENOSPC
            else "fix the cause")
    raise CheckpointSaveError(
        e.errno, f"saving checkpoint step {step} in {directory} failed ({e}); "
        f"{'checkpoint step %d is intact' % max(intact) if intact else 'no earlier checkpoint'}"
        f": {hint} and rerun the same command to resume from it") from e


def abstract_with_sharding(abstract_state: Any, state_sharding: Any) -> Any:
  """ShapeDtypeStructs carrying the shardings the restored arrays should have."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, state_sharding)


def _newest_restorable(steps, restore) -> tuple[Any, int, list[tuple[int, Exception]]]:
  """(restore(step), step, [(newer step, its error)]) for the newest step that restores.

  Raises the newest step's error when none restores: then the checkpoints
  are not damaged but unreadable for this model (another config), and
  nothing is set aside.
  """
  failures = []
  for step in sorted(steps, reverse=True):
    try:
      return restore(step), step, failures
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
      failures.append((step, e))
  raise failures[0][1]


def restore_latest(manager: ocp.CheckpointManager,
                   abstract_state: Any) -> tuple[Any, dict, int] | None:
  """(state, data iterator state, step) of the newest good checkpoint, or None if there is none.

  A newest checkpoint that fails to restore while an older one restores is
  damaged: it is moved to `<workdir>/checkpoints_damaged/<step>` (so the run
  can write that step again) and a warning names both steps.

  Args:
    abstract_state: ShapeDtypeStruct tree (with shardings) of the TrainState.
  """
  steps = manager.all_steps()
  if not steps:
    return None
  restored, step, damaged = _newest_restorable(steps, lambda s: manager.restore(
      s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                 data=ocp.args.JsonRestore())))
  if damaged:
    directory = str(manager.directory)
    target = os.path.join(os.path.dirname(directory), DAMAGED_DIR)
    os.makedirs(target, exist_ok=True)
    for bad, error in damaged:
      dest = os.path.join(target, f"{bad}-{int(time.time())}")
      if jax.process_index() == 0:
        os.replace(os.path.join(directory, str(bad)), dest)
      log.warning("checkpoint step %d is damaged (%s: %s); moved to %s",
                  bad, type(error).__name__, str(error)[:200], dest)
    log.warning("resuming from checkpoint step %d, the newest one that restores", step)
    manager.reload()
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
    if not manager.all_steps():
      raise FileNotFoundError(f"no complete checkpoint in {directory}")
    restore_args = jax.tree.map(
        lambda _: ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=device),
        abstract_fields)
    # Read-only: a damaged newest checkpoint is skipped (and named), not moved.
    restored, step, damaged = _newest_restorable(manager.all_steps(), lambda s: manager.restore(
        s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract_fields, restore_args=restore_args, partial_restore=True))))
    for bad, error in damaged:
      log.warning("checkpoint step %d in %s is damaged (%s); using step %d", bad,
                  directory, type(error).__name__, step)
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


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (Linux /proc), to tell a reused pid; None elsewhere."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _holder_alive(holder: dict) -> bool:
  pid = int(holder.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  start = _process_start(pid)
  # The same pid with another start time is a new process reusing the number.
  return not (holder.get("start") and start and holder["start"] != start)


_HELD: dict[str, int] = {}  # lock path -> nesting depth in this process


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[str]:
  """Holds `<workdir>/train.lock` for the duration; yields its path.

  The file names the holder (pid, host, process start time). A second
  process gets `WorkdirBusyError` naming the holder; a lock left by a process
  that no longer runs (SIGKILL, power loss) is replaced with a warning; a
  lock from another host (shared filesystem) cannot be checked and is
  refused. Re-entrant within a process. Released (deleted) on exit, also on
  exceptions and SIGTERM's clean stop.
  """
  path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
  if path in _HELD:
    _HELD[path] += 1
    try:
      yield path
    finally:
      _HELD[path] -= 1
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  me = {"pid": os.getpid(), "host": socket.gethostname(),
        "start": _process_start(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
  # The guard serialises check-and-replace, so two newcomers cannot both
  # remove a stale lock and then each take it.
  with open(os.path.join(os.path.dirname(path), "." + LOCK_NAME + ".guard"), "a") as guard:
    fcntl.flock(guard, fcntl.LOCK_EX)
    try:
      if os.path.exists(path):
        try:
          with open(path) as f:
            holder = json.load(f)
        except (OSError, ValueError):
          holder = {}
        if holder.get("host") not in (None, me["host"]):
          raise WorkdirBusyError(
              f"{workdir} is locked by a process on host {holder['host']} (pid "
              f"{holder.get('pid')}, since {holder.get('since')}): two training runs on "
              f"one workdir would overwrite each other's checkpoints. If that run is "
              f"gone, delete {path}")
        if _holder_alive(holder):
          raise WorkdirBusyError(
              f"another training process (pid {holder['pid']}, since "
              f"{holder.get('since')}) is using {workdir}: two runs on one workdir "
              f"would overwrite each other's checkpoints. Wait for it, stop it, or "
              f"give this run another --workdir (lock file {path})")
        log.warning("replacing the stale lock %s of pid %s, which no longer runs",
                    path, holder.get("pid"))
      with open(path + ".tmp", "w") as f:
        json.dump(me, f)
      os.replace(path + ".tmp", path)
    finally:
      fcntl.flock(guard, fcntl.LOCK_UN)
  _HELD[path] = 1
  try:
    yield path
  finally:
    del _HELD[path]
    with contextlib.suppress(OSError):
      with open(path) as f:
        still_ours = json.load(f).get("pid") == me["pid"]
      if still_ours:
        os.remove(path)


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
