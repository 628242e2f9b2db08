"""Resume after SIGKILL ends bitwise equal to an uninterrupted run; SIGTERM saves and exits.

The interrupted runs are subprocesses (so they can be killed); they train the
tiny stand-in networks of conftest.py on an in-memory grain iterator.
Bitwise equality holds on CPU because the resumed run restores every input of
the remaining steps exactly (params, both Adam states, EMA, spectral-norm
stats, step, RNG, iterator position) and XLA's CPU code is deterministic.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from conftest import INFO, TinyD, TinyG, tiny_iterator, tiny_loop_config
from medgen_jax.train import checkpoint as ckpt_lib, loop, state as state_lib
from medgen_jax.train.loop import run_training

NUM_STEPS = 6

SCRIPT = textwrap.dedent("""
  import os, sys, time
  sys.path.insert(0, os.environ["TESTS_DIR"])
  from medgen_jax.train.loop import run_training
  from conftest import INFO, TinyD, TinyG, tiny_iterator, tiny_loop_config

  class Slow:
    # Delegating iterator that sleeps after a few batches, so the parent can
    # signal the run while it is mid-way.
    def __init__(self, it): self.it, self.n = it, 0
    def __iter__(self): return self
    def __next__(self):
      self.n += 1
      if self.n > 3: time.sleep(1.0)
      return next(self.it)
    def get_state(self): return self.it.get_state()
    def set_state(self, s): self.it.set_state(s)

  config = tiny_loop_config(num_steps=int(os.environ["NUM_STEPS"]))
  summary = run_training(config, os.environ["WORKDIR"], info=INFO, generator=TinyG(),
                         discriminator=TinyD(), iterator=Slow(tiny_iterator()))
  print("PREEMPTED", summary["preempted"], summary["steps"])
""")


def _start(workdir, num_steps):
  env = dict(os.environ, TESTS_DIR=os.path.dirname(__file__), WORKDIR=str(workdir),
             NUM_STEPS=str(num_steps), JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, workdir, step, timeout=300):
  done = workdir / "checkpoints" / str(step)  # orbax renames the tmp dir when complete
  t0 = time.time()
  while not done.exists():
    if proc.poll() is not None:
      raise AssertionError(f"run exited early: {proc.stderr.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("no checkpoint appeared")
    time.sleep(0.05)


def _final_state(workdir):
  config = tiny_loop_config()
  models = state_lib.make_models(TinyG(), TinyD(), config)
  trainer = loop.make_trainer(config, models, INFO, devices=jax.devices()[:1])
  manager = ckpt_lib.make_manager(str(workdir / "checkpoints"), keep=10)
  state, data_state, step = ckpt_lib.restore_latest(
      manager, ckpt_lib.abstract_with_sharding(trainer.abstract_state, trainer.state_sharding))
  return jax.device_get(state), data_state, step


@pytest.mark.slow  # ~3 compilations of the step (one in a subprocess)
def test_resume_after_sigkill_is_bitwise_equal(tmp_path):
  killed = tmp_path / "killed"
  proc = _start(killed, NUM_STEPS)
  _wait_for_checkpoint(proc, killed, 3)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  latest = max(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert 3 <= latest < NUM_STEPS, latest
  # Resume in this process, and run an uninterrupted reference.
  kw = dict(info=INFO, generator=TinyG(), discriminator=TinyD())
  resumed = run_training(tiny_loop_config(num_steps=NUM_STEPS), str(killed),
                         iterator=tiny_iterator(), **kw)
  assert resumed["start_step"] == latest and resumed["steps"] == NUM_STEPS
  ref = tmp_path / "ref"
  run_training(tiny_loop_config(num_steps=NUM_STEPS), str(ref), iterator=tiny_iterator(), **kw)
  got, got_data, got_step = _final_state(killed)
  want, want_data, want_step = _final_state(ref)
  assert got_step == want_step == NUM_STEPS and got_data == want_data
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # one compilation in a subprocess, ~40 CPU-seconds
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = _start(tmp_path, 1000)
  _wait_for_checkpoint(proc, tmp_path, 2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  line = [l for l in out.splitlines() if l.startswith("PREEMPTED")][-1]
  _, preempted, steps = line.split()
  assert preempted == "True" and 2 <= int(steps) < 1000
  assert (tmp_path / "checkpoints" / steps).exists(), "no checkpoint at the preempted step"


def test_checkpoint_roundtrip_keeps_newest(tmp_path):
  state = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "empty": {},
           "rng": np.asarray(jax.random.PRNGKey(3))}
  manager = ckpt_lib.make_manager(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    ckpt_lib.save(manager, step, jax.tree.map(lambda x: x * step, state), {"next_index": step})
  assert manager.all_steps() == [2, 3]
  abstract = jax.eval_shape(lambda: jax.tree.map(jax.numpy.asarray, state))
  sharding = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                          abstract)
  got, data_state, step = ckpt_lib.restore_latest(
      manager, ckpt_lib.abstract_with_sharding(abstract, sharding))
  assert step == 3 and data_state == {"next_index": 3} and got["empty"] == {}
  np.testing.assert_array_equal(got["w"], state["w"] * 3)
  np.testing.assert_array_equal(got["rng"], state["rng"] * 3)


def test_sigterm_flag_is_set_by_signal_and_handler_restored():
  before = signal.getsignal(signal.SIGTERM)
  with ckpt_lib.sigterm_flag() as flag:
    assert not flag.is_set()
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):
      if flag.is_set():
        break
      time.sleep(0.01)
    assert flag.is_set()
  assert signal.getsignal(signal.SIGTERM) == before
