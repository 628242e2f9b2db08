"""The flow sampler at bf16 and int8: the quantized weights are the ones the
ODE integrates with (the sampler re-applies the velocity network inside a
scan, so the precision must reach that inner call), and the samples stay
close to fp32."""
import numpy as np
import pytest

from conftest import INFO, random_generator_params
from medgen_jax import models
from medgen_jax.inference import quantize, sample
from test_flow_train import tiny_flow_config

B = 4


@pytest.fixture(scope="module")
def flow_samples():
  config = tiny_flow_config()
  config.model.update(sample_steps=4)
  g = models.build_generator(config.model, INFO)
  latent = int(config.model.latent_dim)
  params = random_generator_params(g, INFO, latent, B)
  z = sample.make_noise(0, B, latent)
  cond = sample.build_conditions({}, INFO, B, seed=0)
  out = {}
  for precision in ("fp32", "bf16", "int8"):
    prepared = quantize.prepare_for_sampling(g, params, precision, info=INFO, batch_size=B,
                                             latent_dim=latent)
    out[precision] = (sample.generate(prepared, z, cond, batch_size=B)[0],
                      quantize.stored_bytes(prepared))
  return out


def test_int8_stores_int8_weights_and_samples_with_them(flow_samples):
  fp32, fp32_bytes = flow_samples["fp32"]
  int8, int8_bytes = flow_samples["int8"]
  assert int8_bytes["param_bytes"] < 0.5 * fp32_bytes["param_bytes"]
  diff = np.abs(int8 - fp32)
  # Quantized weights change the integrated sample (a sampler that fell back
  # to the float weights would reproduce fp32 exactly) but only a little.
  assert diff.max() > 1e-4
  assert diff.mean() < 0.01 * np.abs(fp32).mean()


def test_bf16_stays_close_to_fp32(flow_samples):
  fp32, _ = flow_samples["fp32"]
  bf16, _ = flow_samples["bf16"]
  assert np.abs(bf16 - fp32).max() > 0  # it did run in bf16
  assert np.abs(bf16 - fp32).mean() < 0.01 * np.abs(fp32).mean()
