"""What real runs meet: broken files, killed builds, two runs on one workdir,
a damaged newest checkpoint, a full disk while checkpointing."""
import errno
import json
import logging
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import data_folder, folder_gan
from conftest import (INFO, ROOT, TESTS_DIR, TinyD, TinyG, ct_volume, tiny_iterator,
                      tiny_loop_config, write_nifti)
from medgen_jax import data
from medgen_jax.data import readers
from medgen_jax.train import checkpoint as ckpt_lib
from medgen_jax.train import loop


def folder_config(source, out):
  c = data_folder.get_config("quick")
  c.source_dir, c.data_dir = str(source), str(out)
  c.split_fractions = (0.6, 0.2, 0.2)
  c.foreground_only = False
  return c


def _good_folder(src, n):
  src.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    write_nifti(src / f"s{i}.nii.gz", ct_volume(i))


def _complete_datasets(out):
  return [d for d, _, files in os.walk(out) if "dataset_info.json" in files]


# ---------------------------------------------------------------- data build

def test_broken_files_among_good_ones_are_skipped_and_counted(tmp_path):
  src = tmp_path / "src"
  _good_folder(src, 4)
  good = (src / "s0.nii.gz").read_bytes()
  (src / "cut.nii.gz").write_bytes(good[: len(good) // 3])        # truncated transfer
  (src / "empty.nii.gz").write_bytes(b"")                         # zero bytes
  (src / "noise.npy").write_bytes(os.urandom(300))                # not an array
  (src / "dangling.nii.gz").symlink_to(tmp_path / "gone.nii.gz")  # unmounted share
  from PIL import Image
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(src / "half.png")
  png = (src / "half.png").read_bytes()
  (src / "half.png").write_bytes(png[: len(png) // 2])
  summary = data.build(folder_config(src, tmp_path / "out"))
  assert sum(summary["subjects"].values()) == 4
  assert sum(summary["examples"].values()) == 4 * 6  # 6 slices of each good volume
  assert summary["skipped_counts"] == {"not a readable NIfTI file": 2,
                                       "not a readable .npy array": 1,
                                       "not a readable PNG": 1,
                                       "not a readable file": 1}
  salt = data_folder.get_config().id_salt
  assert {s["subject"] for s in summary["skipped"]} == {
      readers.opaque_id(n, salt) for n in ("cut", "empty", "noise", "dangling", "half")}


_KILLER = r"""
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
from medgen_jax import data
from medgen_jax.data import builders_folder
import test_robust_runs as t
real, calls = builders_folder._load, []
def dying(*args, **kwargs):
  calls.append(1)
  if len(calls) > {after}:  # plan() read every subject; writing is under way
    os.kill(os.getpid(), signal.SIGKILL)
  return real(*args, **kwargs)
builders_folder._load = dying
data.build(t.folder_config({src!r}, {out!r}))
"""


def test_build_killed_midway_rebuilds_cleanly(tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  _good_folder(src, 5)
  script = _KILLER.format(root=ROOT, tests=TESTS_DIR, after=7, src=str(src), out=str(out))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  # Killed while writing: a partial directory, nothing that looks complete.
  partial = [d for d, dirs, _ in os.walk(out) for d in dirs if d.startswith("incomplete.")]
  assert partial and not _complete_datasets(out)
  summary = data.build(folder_config(src, out))
  assert sum(summary["subjects"].values()) == 5
  assert summary["num_examples"] == summary["examples"]  # every example written
  assert not [d for d, dirs, _ in os.walk(out) for d in dirs if d.startswith("incomplete.")]
  arrays = data.load_arrays(folder_config(src, out), split="train")
  assert len(arrays["image"]) == summary["examples"]["train"]


# ------------------------------------------------------------- workdir lock

_HOLDER = r"""
import sys, time
sys.path[:0] = [{root!r}]
from medgen_jax.train import checkpoint
with checkpoint.workdir_lock({workdir!r}):
  print("locked", flush=True)
  time.sleep(300)
"""


def _hold_lock(workdir):
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(root=ROOT, workdir=str(workdir))],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_second_training_process_refuses_the_workdir(tmp_path, caplog):
  workdir = tmp_path / "run"
  holder = _hold_lock(workdir)
  try:
    lock = json.loads((workdir / ckpt_lib.LOCK_NAME).read_text())
    assert lock["pid"] == holder.pid
    src = tmp_path / "src"
    _good_folder(src, 3)
    config = folder_gan.get_config("quick")
    config.data.source_dir, config.data.data_dir = str(src), str(tmp_path / "tfds")
    with pytest.raises(ckpt_lib.WorkdirBusyError,
                       match=rf"another training process \(pid {holder.pid}.*another --workdir"):
      loop.train_and_evaluate(config, str(workdir))
    assert not (tmp_path / "tfds").exists()  # refused before any data work
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The holder died without releasing: its lock is stale and replaced.
  with caplog.at_level(logging.WARNING, logger="medgen_jax.train"):
    with ckpt_lib.workdir_lock(str(workdir)):
      assert json.loads((workdir / ckpt_lib.LOCK_NAME).read_text())["pid"] == os.getpid()
      with ckpt_lib.workdir_lock(str(workdir)):  # re-entrant in one process
        pass
      assert (workdir / ckpt_lib.LOCK_NAME).exists()
  assert f"stale lock {workdir / ckpt_lib.LOCK_NAME} of pid {holder.pid}" in caplog.text
  assert not (workdir / ckpt_lib.LOCK_NAME).exists()  # released on exit


def test_lock_is_released_on_error_and_a_reused_pid_is_stale(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(RuntimeError, match="boom"):
    with ckpt_lib.workdir_lock(str(workdir)):
      raise RuntimeError("boom")
  assert not (workdir / ckpt_lib.LOCK_NAME).exists()
  # A live pid whose start time differs is another process that reuses the number.
  (workdir / ckpt_lib.LOCK_NAME).write_text(json.dumps(
      {"pid": os.getppid(), "host": os.uname().nodename, "start": "1"}))
  with ckpt_lib.workdir_lock(str(workdir)):
    pass


# --------------------------------------------------------------- checkpoints

def _state(value):
  return {"w": jnp.full((4, 3), value, jnp.float32), "step": jnp.asarray(int(value))}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0.0))


def _damage(step_dir):
  """Overwrites every array data file of the checkpoint's state with garbage."""
  hit = 0
  for d, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      if os.path.basename(d) == "d":
        path = os.path.join(d, f)
        with open(path, "r+b") as fh:
          fh.write(os.urandom(os.path.getsize(path)))
        hit += 1
  assert hit


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  manager = ckpt_lib.make_manager(str(directory), keep=3)
  ckpt_lib.save(manager, 2, _state(2.0), {"pos": 2})
  ckpt_lib.save(manager, 4, _state(4.0), {"pos": 4})
  manager.close()
  _damage(directory / "4")
  manager = ckpt_lib.make_manager(str(directory), keep=3)
  with caplog.at_level(logging.WARNING, logger="medgen_jax.train"):
    state, data_state, step = ckpt_lib.restore_latest(manager, _abstract())
  assert step == 2 and data_state == {"pos": 2}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 2.0))
  assert "checkpoint step 4 is damaged" in caplog.text
  assert "resuming from checkpoint step 2" in caplog.text
  moved = os.listdir(tmp_path / ckpt_lib.DAMAGED_DIR)
  assert len(moved) == 1 and moved[0].startswith("4-")
  assert manager.all_steps() == [2]
  ckpt_lib.save(manager, 4, _state(4.5), {"pos": 4})  # the step can be written again
  manager.close()
  manager = ckpt_lib.make_manager(str(directory), keep=3)
  state, _, step = ckpt_lib.restore_latest(manager, _abstract())
  assert step == 4 and float(state["w"][0, 0]) == 4.5
  manager.close()


def test_checkpoints_of_another_model_are_an_error_not_damage(tmp_path):
  directory = tmp_path / "checkpoints"
  manager = ckpt_lib.make_manager(str(directory), keep=3)
  ckpt_lib.save(manager, 2, _state(2.0), {})
  ckpt_lib.save(manager, 4, _state(4.0), {})
  other = {"w": jax.ShapeDtypeStruct((5, 5), jnp.float32),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  with pytest.raises(Exception):
    ckpt_lib.restore_latest(manager, other)
  manager.close()
  assert sorted(os.listdir(directory)) == ["2", "4"]  # nothing set aside
  assert not (tmp_path / ckpt_lib.DAMAGED_DIR).exists()


@pytest.mark.slow  # two tiny training runs: ~50 s of CPU compilation on the shared machine
def test_training_resumes_from_the_previous_good_checkpoint(tmp_path, caplog):
  config = tiny_loop_config(num_steps=4, checkpoint_every=2)
  kwargs = dict(info=INFO, generator=TinyG(), discriminator=TinyD())
  loop.run_training(config, str(tmp_path), iterator=tiny_iterator(), **kwargs)
  assert ckpt_lib.latest_step(str(tmp_path)) == 4
  _damage(tmp_path / "checkpoints" / "4")
  config.train.num_steps = 6
  with caplog.at_level(logging.WARNING, logger="medgen_jax.train"):
    summary = loop.run_training(config, str(tmp_path), iterator=tiny_iterator(), **kwargs)
  assert summary["start_step"] == 2 and summary["steps"] == 6
  assert "checkpoint step 4 is damaged" in caplog.text
  assert "resuming from checkpoint step 2" in caplog.text
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [2, 4, 6]


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch):
  directory = tmp_path / "checkpoints"
  manager = ckpt_lib.make_manager(str(directory), keep=1)
  ckpt_lib.save(manager, 2, _state(2.0), {"pos": 2})
  written = []

  def no_space(self, directory, *args, **kwargs):
    written.append(os.listdir(os.path.dirname(directory)))  # the state item is on disk
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", no_space)
  with pytest.raises(ckpt_lib.CheckpointSaveError,
                     match=r"saving checkpoint step 4 .*checkpoint step 2 is intact: the disk "
                           r"is full") as err:
    ckpt_lib.save(manager, 4, _state(4.0), {"pos": 4})
  assert err.value.errno == errno.ENOSPC
  assert written  # the failure came in the middle of writing step 4
  manager.close()
  monkeypatch.undo()
  assert sorted(os.listdir(directory)) == ["2"]  # no partial step 4 left
  manager = ckpt_lib.make_manager(str(directory), keep=1)
  state, data_state, step = ckpt_lib.restore_latest(manager, _abstract())
  assert step == 2 and data_state == {"pos": 2}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 2.0))
  ckpt_lib.save(manager, 4, _state(4.0), {"pos": 4})  # with space again, it saves
  assert manager.all_steps() == [4]
  manager.close()


def test_sampling_reads_the_newest_good_checkpoint(tmp_path, caplog):
  manager = ckpt_lib.make_manager(ckpt_lib.checkpoint_dir(str(tmp_path)), keep=3)
  ckpt_lib.save(manager, 2, _state(2.0), {})
  ckpt_lib.save(manager, 4, _state(4.0), {})
  manager.close()
  _damage(tmp_path / "checkpoints" / "4")
  with caplog.at_level(logging.WARNING, logger="medgen_jax.train"):
    fields, step = ckpt_lib.restore_fields(
        str(tmp_path), {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32)})
  assert step == 2
  np.testing.assert_array_equal(np.asarray(fields["w"]), np.full((4, 3), 2.0))
  assert "checkpoint step 4" in caplog.text and "is damaged" in caplog.text
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # read-only: nothing moved
