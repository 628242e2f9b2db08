"""jit on 1 device == jit+NamedSharding / pmap / shard_map on 8 simulated CPU devices.

Runs in a subprocess because the device count is fixed when JAX initialises.
Tolerance: rtol 1e-5 / atol 1e-6. The modes compute the same maths on the
same noise and augmentation (drawn for the global batch), but batch means are
reduced in a different order (one sum over 8 examples vs a mean of 8
per-device means via all-reduce), so results agree to float32 rounding, not
bitwise, and Adam's normalisation can amplify the last-bit differences a little.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
  import os, sys
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  sys.path.insert(0, os.environ["TESTS_DIR"])
  import jax, numpy as np
  from jax.sharding import PartitionSpec as P
  from medgen_jax.train import parallel, state as state_lib
  from test_train_step import INFO, TinyD, TinyG, tiny_batch, tiny_config

  assert jax.device_count() == 8
  out = {}
  for name, mode, devices in [("single", "jit", jax.devices()[:1]), ("jit", "jit", None),
                              ("pmap", "pmap", None), ("shard_map", "shard_map", None)]:
    config = tiny_config()
    config.parallel.mode = mode
    models = state_lib.make_models(TinyG(), TinyD(), config)
    trainer = parallel.build_trainer(config, models, INFO, devices=devices)
    state = trainer.init_state()
    for i in range(3):  # r1_every=2: steps 0 and 2 take the R1 branch
      batch = trainer.put_batch(tiny_batch(i))
      if name == "jit":
        assert batch["image"].sharding.spec == P("data"), batch["image"].sharding
      state, metrics = trainer.step(state, batch)
      for k in ("d_loss", "g_loss", "r1"):
        out[f"{name}/{k}/{i}"] = np.asarray(metrics[k])
    host = jax.device_get(trainer.get_state(state))
    leaves = jax.tree_util.tree_leaves_with_path(
        (host.g_params, host.d_params, host.ema_params, host.d_state))
    for path, leaf in leaves:
      out[f"{name}/param{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    out[f"{name}/step"] = np.asarray(host.step)
  np.savez(os.environ["OUT"], **out)
""")


@pytest.mark.slow  # ~2 CPU-minutes: four compilations of the step with lax.cond
def test_modes_match_single_device(tmp_path):
  out = tmp_path / "out.npz"
  env = dict(os.environ, TESTS_DIR=os.path.dirname(__file__), OUT=str(out),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = np.load(out)
  ref = {k.split("/", 1)[1]: res[k] for k in res.files if k.startswith("single/")}
  assert int(ref["step"]) == 3 and float(ref["r1/0"]) > 0 and float(ref["r1/1"]) == 0
  assert len([k for k in ref if k.startswith("param")]) >= 10
  for mode in ("jit", "pmap", "shard_map"):
    for key, want in ref.items():
      np.testing.assert_allclose(res[f"{mode}/{key}"], want, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{mode}: {key}")
