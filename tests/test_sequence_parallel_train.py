"""The 3D generator sharded over mesh data=2 x seq=4 equals its single-device self.

8-device checks run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the device count is fixed when JAX initialises), on the `configs/phantom_3d.py:quick`
model (8x16x16 volumes, a 4x8x8 token grid: one depth plane per `seq` shard):

* fast: generator forward + parameter gradients of a fixed objective, axial
  and full attention, seq-sharded vs unsharded; the compiled program must
  contain the all-to-all (axial) / collective-permute (ring) that only the
  sharded attention emits, and the first block's output must come out of
  the jitted call sharded P('data', 'seq').
* slow: three GAN train steps (`parallel.build_trainer`, R1 every step) with
  mesh data=2 x seq=4 vs one device: losses and all parameters.

Tolerances: the sharded program does the same maths, but the ring's online
softmax and the all-to-all's regrouped batched matmuls sum in another order,
so results agree to float32 rounding (measured: losses to ~1e-7 relative,
generator gradients to ~1e-6 relative). After Adam, a parameter whose
gradient is near zero can move by a visible fraction of a step
(g / (sqrt(v) + eps) amplifies relative rounding of tiny g), so parameters
are compared with atol 2e-5, 10 % of one Adam step at lr 2e-4; any real
layout bug (a wrong shard order, a missing exchange) changes losses at
the 1e-2 level and parameters by whole steps.
"""
import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from configs import phantom_3d
from medgen_jax.attention import registry
from medgen_jax.train import parallel

SCRIPT = textwrap.dedent("""
  import os, sys
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from configs import phantom_3d
  from medgen_jax import models as models_lib
  from medgen_jax.bench.train_step import phantom_info, synthetic_batch
  from medgen_jax.train import loop, parallel, state as state_lib

  assert jax.device_count() == 8
  what, attentions = sys.argv[1], sys.argv[2:]
  out = {}

  def setup(mesh, attention, small=False):
    config = phantom_3d.get_config(f"quick,attention={attention},seq=4")
    config.parallel.mesh = mesh
    if small:  # 4x8x8 volumes = the 4x8x8 token grid: no conv stage to compile
      config.data.update(depth=4, image_size=8)
    config.loss.r1_every = 1  # every step takes the R1 branch: one executable per run
    info = phantom_info(config.data)
    models = state_lib.make_models(models_lib.build_generator(config.model, info),
                                   models_lib.build_discriminator(config.model, info), config)
    return config, info, models

  def check_generator(attention):
    config, info, models = setup(dict(data=2, seq=4), attention, small=True)
    mesh = parallel.make_mesh(config.parallel)
    G = models.generator
    G_sp = parallel.sequence_parallel_models(models, mesh, config.parallel).generator
    assert G_sp.sequence_sharding is not None and G.sequence_sharding is None
    z = jax.random.normal(jax.random.PRNGKey(1), (4, config.model.latent_dim))
    cond = state_lib.dummy_conditions(info, 4)
    params = jax.jit(lambda z: G.init(jax.random.PRNGKey(0), z, cond, train=False))(z)["params"]
    # Off the init point: adaLN-Zero gates start at 0, which would zero every
    # attention gradient.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = treedef.unflatten([p + 0.1 * jax.random.normal(k, p.shape)
                                for p, k in zip(leaves, keys)])
    target = jax.random.normal(jax.random.PRNGKey(2), (4,) + tuple(info.image_shape))

    def objective(G):
      def f(params, z):
        image, inter = G.apply({"params": params}, z, cond, train=False,
                               capture_intermediates=lambda m, _: m.name == "block_0_0",
                               mutable=["intermediates"])
        block = inter["intermediates"]["block_0_0"]["__call__"][0]
        return jnp.mean((image - target) ** 2), (image, block)
      return jax.value_and_grad(f, has_aux=True)

    (loss, (image, _)), grads = jax.jit(objective(G))(params, z)
    z_sp = jax.device_put(z, NamedSharding(mesh, P("data")))
    params_sp = jax.device_put(params, NamedSharding(mesh, P()))
    compiled = jax.jit(objective(G_sp)).lower(params_sp, z_sp).compile()
    (loss_sp, (image_sp, block_sp)), grads_sp = compiled(params_sp, z_sp)
    # Same parameter tree either way, so checkpoints load into both.
    sp_init = jax.eval_shape(lambda z: G_sp.init(jax.random.PRNGKey(0), z, cond, train=False), z)
    assert jax.tree.structure(sp_init["params"]) == jax.tree.structure(grads_sp)
    assert jax.tree.structure(grads) == jax.tree.structure(grads_sp)
    spec = block_sp.sharding.spec
    assert tuple(spec)[:2] == ("data", "seq"), spec
    hlo = compiled.as_text()
    op = {"axial": "all-to-all", "full": "collective-permute"}[attention]
    assert op in hlo, f"no {op} in the compiled sharded generator"
    out.update({f"{attention}/loss": loss, f"{attention}/loss_sp": loss_sp,
                f"{attention}/image": image, f"{attention}/image_sp": image_sp})
    for (path, g), g_sp in zip(jax.tree_util.tree_leaves_with_path(grads),
                               jax.tree.leaves(grads_sp)):
      out[f"{attention}/grad{jax.tree_util.keystr(path)}"] = g
      out[f"{attention}/grad_sp{jax.tree_util.keystr(path)}"] = g_sp

  if what == "generator":
    for attention in attentions:
      check_generator(attention)
  else:
    for name, mesh, devices in [("single", dict(data=1, seq=1), jax.devices()[:1]),
                                ("sp", dict(data=2, seq=4), None)]:
      config, info, models = setup(mesh, attentions[0])
      trainer = loop.make_trainer(config, models, info, devices=devices)
      state = trainer.init_state()
      for i in range(3):
        batch = trainer.put_batch(synthetic_batch(info, config.train.batch_size, seed=i))
        state, metrics = trainer.step(state, batch, with_r1=True)
        for k in ("d_loss", "g_loss", "r1", "g_grad_norm"):
          out[f"{name}/{k}/{i}"] = np.asarray(metrics[k])
      host = jax.device_get(trainer.get_state(state))
      for path, leaf in jax.tree_util.tree_leaves_with_path(
          (host.g_params, host.d_params, host.ema_params)):
        out[f"{name}/param{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  np.savez(os.environ["OUT"], **{k: np.asarray(v) for k, v in out.items()})
""")


def _run(tmp_path, *args):
  out = tmp_path / "out.npz"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, OUT=str(out), JAX_PLATFORMS="cpu", PYTHONPATH=root)
  proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True,
                        text=True, timeout=1200, cwd=root)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return np.load(out)


# ~25 s each on the idle 2-core CPU: -m slow. The default suite keeps the
# 8-device ring itself (tests/test_sequence_parallel.py).
@pytest.mark.slow
@pytest.mark.parametrize("attention", ["axial", "full"])
def test_sharded_generator_matches_unsharded(tmp_path, attention):
  res = _run(tmp_path, "generator", attention)
  got = lambda key: res[f"{attention}/{key}"]
  np.testing.assert_allclose(got("loss_sp"), got("loss"), rtol=1e-5)
  np.testing.assert_allclose(got("image_sp"), got("image"), rtol=1e-5, atol=1e-6)
  grads = [k.split("/", 1)[1] for k in res.files if k.startswith(f"{attention}/grad[")]
  assert len(grads) >= 20
  # Attention parameters get their gradient through the exchanged tokens.
  assert any("query_proj" in k and np.abs(got(k)).max() > 0 for k in grads)
  for key in grads:
    want = got(key)
    np.testing.assert_allclose(got("grad_sp" + key[4:]), want, rtol=1e-4,
                               atol=1e-5 * max(np.abs(want).max(), 1e-3), err_msg=key)


@pytest.mark.slow  # two GAN-step compilations of a 3D model: minutes on a shared 2-core CPU
@pytest.mark.parametrize("attention", ["axial", "full"])
def test_seq_sharded_training_matches_single_device(tmp_path, attention):
  res = _run(tmp_path, "train", attention)
  ref = {k.split("/", 1)[1]: res[k] for k in res.files if k.startswith("single/")}
  assert float(ref["r1/0"]) > 0 and len([k for k in ref if k.startswith("param")]) >= 30
  for key, want in ref.items():
    got = res[f"sp/{key}"]
    if key.startswith("param"):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5, err_msg=key)
    else:
      np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)


# --- In-process: config checks and the seq == 1 default (no devices needed). ---


def _parallel(mode="jit", seq=4, rules=(("batch", "data"), ("depth", "seq"))):
  return ml_collections.ConfigDict(dict(mode=mode, mesh=dict(data=-1, seq=seq),
                                        logical_axis_rules=rules))


QUICK = phantom_3d.get_config("quick")  # axial, token grid 4x8x8, Ti heads (2, ...)


def _model(**overrides):
  model = ml_collections.ConfigDict(QUICK.model.to_dict())
  model.update(overrides)
  return model


def test_validate_accepts_the_quick_volume_on_seq_4():
  shape = parallel.validate(_parallel(), 2, 8, model_config=_model(),
                            spatial_shape=(8, 16, 16))
  assert shape == {"data": 2, "seq": 4}


@pytest.mark.parametrize("pcfg, model, spatial, fragment", [
    (_parallel(mode="pmap"), None, None, "'pmap' is data parallel only"),
    (_parallel(mode="shard_map"), None, None, "needs parallel.mode 'jit'"),
    (_parallel(rules=(("batch", "data"),)), None, None, "logical_axis_rules to map"),
    (_parallel(), _model(attention="window"), (8, 16, 16), "model.attention"),
    (_parallel(), _model(generator="cnn"), (8, 16, 16), "model.generator"),
    (_parallel(seq=8), _model(), (8, 16, 16), "depth 4, not divisible by seq"),
    (_parallel(seq=2), _model(attention="full", chunk_size=48), (8, 16, 16),
     "model.chunk_size=48"),
    (_parallel(rules=(("batch", "data"), ("width", "seq"))), _model(attention="full"),
     (8, 16, 16), "full (ring) attention needs the first axis"),
])
def test_validate_rejects_layouts_that_cannot_shard(pcfg, model, spatial, fragment):
  with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
    parallel.validate(pcfg, 8, 8, model_config=model, spatial_shape=spatial)


def test_axial_all_to_all_needs_a_divisible_axis():
  # 2D, Ti's 2 heads, seq=4, one token row per shard. A 4x4 grid (16x16 image,
  # token_grid 4) can split its width for the all-to-all; a 4x2 grid (32x16,
  # token_grid 2) has neither heads nor width divisible by 4.
  pcfg = _parallel(seq=4, rules=(("batch", "data"), ("height", "seq")))
  parallel.validate(pcfg, 2, 8, model_config=_model(), spatial_shape=(16, 16))
  with pytest.raises(ValueError, match="all-to-all of axial attention"):
    parallel.validate(pcfg, 2, 8, model_config=_model(token_grid=2), spatial_shape=(32, 16))


def test_seq_1_keeps_the_generator_untouched():
  import jax
  from medgen_jax.train import state as state_lib
  from medgen_jax.models import build_generator
  from medgen_jax.bench.train_step import phantom_info
  info = phantom_info(QUICK.data)
  models = state_lib.make_models(build_generator(QUICK.model, info), None, QUICK)
  mesh = parallel.make_mesh(_parallel(seq=1), jax.devices()[:1])
  assert parallel.sequence_parallel_models(models, mesh, QUICK.parallel) is models
  assert models.generator.sequence_sharding is None


def test_windowed_attention_has_no_sequence_parallel_form():
  with pytest.raises(ValueError, match="'window_shifted' has no sequence-parallel form"):
    registry.sequence_parallel_form("window_shifted")
