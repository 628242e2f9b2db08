"""jit on 1 device == jit+NamedSharding / pmap / shard_map on 8 simulated CPU devices.

Runs in a subprocess because the device count is fixed when JAX initialises.
Tolerance: rtol 1e-5 / atol 1e-6. The modes compute the same maths on the
same noise and augmentation (drawn for the global batch), but batch means are
reduced in a different order (one sum over 8 examples vs a mean of 8
per-device means via all-reduce), so results agree to float32 rounding, not
bitwise, and Adam's normalisation can amplify the last-bit differences a little.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import INFO, TinyD, TinyG, tiny_batch, tiny_config
from medgen_jax.train import loop, state as state_lib, step as step_lib

SCRIPT = textwrap.dedent("""
  import os, sys
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
  sys.path.insert(0, os.environ["TESTS_DIR"])
  import json
  import jax, numpy as np
  from jax.sharding import PartitionSpec as P
  from medgen_jax.train import loop, parallel, state as state_lib, step as step_lib
  from conftest import INFO, TinyD, TinyG, tiny_batch, tiny_config

  assert jax.device_count() == 8
  out = {}
  for name, mode, devices in [("single", "jit", jax.devices()[:1]), ("jit", "jit", None),
                              ("pmap", "pmap", None), ("shard_map", "shard_map", None)]:
    config = tiny_config(**json.loads(os.environ["LOSS"]))
    config.parallel.mode = mode
    models = state_lib.make_models(TinyG(), TinyD(), config)
    trainer = loop.make_trainer(config, models, INFO, devices=devices)
    state = trainer.init_state()
    for i in range(3):  # r1_every=2: steps 0 and 2 take the R1 branch
      batch = trainer.put_batch(tiny_batch(i))
      if name == "jit":
        assert batch["image"].sharding.spec == P("data"), batch["image"].sharding
      state, metrics = trainer.step(state, batch, with_r1=step_lib.r1_due(config.loss, i))
      for k in ("d_loss", "g_loss", "r1", "r2"):
        out[f"{name}/{k}/{i}"] = np.asarray(metrics[k])
    host = jax.device_get(trainer.get_state(state))
    leaves = jax.tree_util.tree_leaves_with_path(
        (host.g_params, host.d_params, host.ema_params, host.d_state))
    for path, leaf in leaves:
      out[f"{name}/param{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    out[f"{name}/step"] = np.asarray(host.step)
  np.savez(os.environ["OUT"], **out)
""")


# The relativistic loss pairs real i with fake i inside each device's slice
# and adds R2 on the fakes: it must agree across modes like the plain loss.
@pytest.mark.slow  # ~2 CPU-minutes per loss: eight compilations of the step
@pytest.mark.parametrize("loss", [{}, {"gan": "rpgan", "r2_gamma": 0.5}])
def test_modes_match_single_device(tmp_path, loss):
  out = tmp_path / "out.npz"
  env = dict(os.environ, TESTS_DIR=os.path.dirname(__file__), OUT=str(out),
             JAX_PLATFORMS="cpu", LOSS=json.dumps(loss))
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = np.load(out)
  ref = {k.split("/", 1)[1]: res[k] for k in res.files if k.startswith("single/")}
  assert int(ref["step"]) == 3 and float(ref["r1/0"]) > 0 and float(ref["r1/1"]) == 0
  assert (float(ref["r2/0"]) > 0) == bool(loss) and float(ref["r2/1"]) == 0
  assert len([k for k in ref if k.startswith("param")]) >= 10
  for mode in ("jit", "pmap", "shard_map"):
    for key, want in ref.items():
      np.testing.assert_allclose(res[f"{mode}/{key}"], want, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{mode}: {key}")


MULTI_SCRIPT = textwrap.dedent("""
  import os, sys
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=2")
  sys.path.insert(0, os.environ["TESTS_DIR"])
  import jax, numpy as np
  from medgen_jax.train import loop, parallel, state as state_lib, step as step_lib
  from conftest import INFO, TinyD, TinyG, tiny_batch, tiny_config

  pid = int(os.environ["PID"])
  config = tiny_config()
  config.parallel.update(distributed=True, coordinator_address=os.environ["COORD"],
                         num_processes=2, process_id=pid)
  parallel.maybe_initialize_distributed(config.parallel)
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  models = state_lib.make_models(TinyG(), TinyD(), config)
  trainer = loop.make_trainer(config, models, INFO)
  state = trainer.init_state()
  for i in range(3):
    batch = tiny_batch(i)  # the global batch; this process feeds its half
    local = {k: v[pid * 4:(pid + 1) * 4] for k, v in batch.items()}
    state, metrics = trainer.step(state, trainer.put_batch(local),
                                 with_r1=step_lib.r1_due(config.loss, i))
  host = trainer.get_state(state)
  leaves = jax.tree.leaves((host.g_params, host.d_params, host.ema_params))
  np.savez(os.environ["OUT"], *[np.asarray(x.addressable_data(0)) for x in leaves],
           d_loss=np.asarray(metrics["d_loss"].addressable_data(0)))
""")


@pytest.mark.slow  # two processes plus a reference, each compiling the step
def test_two_processes_train_in_lockstep_like_one(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    env = dict(os.environ, TESTS_DIR=os.path.dirname(__file__), PID=str(pid),
               COORD=f"127.0.0.1:{port}", OUT=str(tmp_path / f"p{pid}.npz"),
               JAX_PLATFORMS="cpu")
    procs.append(subprocess.Popen([sys.executable, "-c", MULTI_SCRIPT], env=env,
                                  stderr=subprocess.PIPE, text=True))
  # Reference: one process, one device, the same global batches.
  config = tiny_config()
  trainer = loop.make_trainer(config, state_lib.make_models(TinyG(), TinyD(), config),
                               INFO, devices=jax.devices()[:1])
  state = trainer.init_state()
  for i in range(3):
    state, metrics = trainer.step(state, trainer.put_batch(tiny_batch(i)),
                                 with_r1=step_lib.r1_due(config.loss, i))
  want = [np.asarray(x) for x in jax.tree.leaves((state.g_params, state.d_params,
                                                  state.ema_params))]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  for pid in range(2):
    got = np.load(tmp_path / f"p{pid}.npz")
    np.testing.assert_allclose(got["d_loss"], metrics["d_loss"], rtol=1e-5)
    for i, w in enumerate(want):  # same tolerance and reason as above
      np.testing.assert_allclose(got[f"arr_{i}"], w, rtol=1e-5, atol=1e-6)
