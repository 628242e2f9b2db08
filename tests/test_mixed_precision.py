"""model.dtype=bfloat16: float32 parameters and optimiser state, bf16 activations,
float32 images, logits, losses and R1/R2 penalties; a few steps stay close to float32.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import phantom_gan
from medgen_jax import models as models_lib
from medgen_jax.bench import train_step as bench_step
from medgen_jax.train import state as state_lib, step as step_lib


def quick_config(dtype):
  config = phantom_gan.get_config("quick")
  config.model.dtype = dtype
  config.loss.teacher_weight = 0.0  # the teacher is a separate float32 network
  return config


def build(config):
  info = bench_step.phantom_info(config.data)
  generator = models_lib.build_generator(config.model, info)
  discriminator = models_lib.build_discriminator(config.model, info)
  return info, generator, discriminator


def float_dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.slow  # ~2 minutes of op-by-op dispatch of the quick G and D here
def test_bf16_model_boundaries():
  config = quick_config("bfloat16")
  info, generator, discriminator = build(config)
  conditions = state_lib.dummy_conditions(info, 2)
  z = jax.random.normal(jax.random.PRNGKey(0), (2, config.model.latent_dim))
  g_vars = generator.init(jax.random.PRNGKey(1), z, conditions, train=False)
  assert float_dtypes(g_vars["params"]) == {"float32"}
  image, inter = generator.apply(g_vars, z, conditions, train=False,
                                 capture_intermediates=True)
  assert image.dtype == jnp.float32
  # The layers in between compute in bf16 (otherwise the flag did nothing).
  assert "bfloat16" in float_dtypes(inter["intermediates"])
  d_vars = discriminator.init(jax.random.PRNGKey(2), image, conditions, train=False)
  assert float_dtypes(d_vars["params"]) == {"float32"}
  logits = discriminator.apply(d_vars, image, conditions, train=False)
  assert logits.dtype == jnp.float32
  # R1's image gradient comes back in the images' float32.
  grad = jax.grad(lambda x: jnp.sum(discriminator.apply(d_vars, x, conditions,
                                                        train=False)))(image)
  assert grad.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(grad)))


def run_steps(dtype, num_steps=2):
  config = quick_config(dtype)
  info, generator, discriminator = build(config)
  models = state_lib.make_models(generator, discriminator, config, teacher=None)
  init = state_lib.make_init_fn(models, info, latent_dim=config.model.latent_dim,
                                seed=config.train.seed)
  state = jax.jit(init)()
  step_fn = step_lib.trainer_hooks(config, models, info)["step_fn"]
  steps = {r1: jax.jit(functools.partial(step_fn, models=models, with_r1=r1))
           for r1 in (True, False)}
  metrics = []
  for i in range(num_steps):
    batch = bench_step.synthetic_batch(info, config.train.batch_size, seed=i)
    state, m = steps[i % 2 == 0](state, batch)
    metrics.append({k: float(v) for k, v in m.items() if np.ndim(v) == 0})
  return state, metrics


@pytest.mark.slow  # compiles the quick GAN step four times (~4-5 minutes here)
def test_bf16_steps_track_float32():
  s32, m32 = run_steps("float32")
  s16, m16 = run_steps("bfloat16")
  # Parameters, EMA and optimiser state stay float32 in the bf16 run.
  for tree in (s16.g_params, s16.d_params, s16.ema_params, s16.g_opt_state,
               s16.d_opt_state):
    assert float_dtypes(tree) <= {"float32"}, float_dtypes(tree)
  # Losses and penalties within 5 % (measured: <= 1 % over 3 steps).
  for a, b in zip(m32, m16):
    for key in ("d_loss", "g_loss", "r1"):
      np.testing.assert_allclose(b[key], a[key], rtol=5e-2, atol=1e-3, err_msg=key)
  assert m16[0]["r1"] > 0
  # bf16 really ran: the losses are not bit-identical to float32.
  assert any(a["d_loss"] != b["d_loss"] or a["g_loss"] != b["g_loss"]
             for a, b in zip(m32, m16))
  # Parameters within 5e-3 after two Adam steps (measured: 1.2e-3 after 3).
  diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       (s32.g_params, s32.d_params), (s16.g_params, s16.d_params))
  assert max(jax.tree.leaves(diffs)) < 5e-3
