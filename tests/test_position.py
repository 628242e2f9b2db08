"""Position encodings: sinusoidal properties, learned embedding, Swin relative bias."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.attention import (LearnedPositionEmbedding, RelativePositionBias,
                                  sinusoidal_position_encoding)


def test_sinusoidal_hand_computed_1d():
  enc = sinusoidal_position_encoding((5,), 4)
  # Frequencies 10000 ** (-0/4) = 1 and 10000 ** (-2/4) = 0.01, interleaved sin/cos.
  np.testing.assert_allclose(enc[3], [np.sin(3), np.cos(3), np.sin(0.03), np.cos(0.03)],
                             rtol=1e-6)


@pytest.mark.parametrize("shape,dim", [((7,), 8), ((4, 6), 16), ((3, 4, 5), 24)])
def test_sinusoidal_properties(shape, dim):
  enc = np.asarray(sinusoidal_position_encoding(shape, dim))
  assert enc.shape == shape + (dim,) and enc.dtype == np.float32
  assert enc.min() >= -1.0 and enc.max() <= 1.0
  rows = enc.reshape(-1, dim)
  assert len(np.unique(rows.round(5), axis=0)) == rows.shape[0]  # every position distinct
  # Channels split evenly: axis a's block changes only along coordinate a.
  per_axis = dim // len(shape)
  for a in range(len(shape)):
    block = enc[..., a * per_axis:(a + 1) * per_axis]
    for other in range(len(shape)):
      if other != a:
        assert np.all(np.diff(block, axis=other) == 0)
  # Translation structure: <e(p), e(p + o)> depends only on the offset o.
  coords = list(itertools.product(*[range(s) for s in shape]))
  for a in range(len(shape)):
    offset = np.zeros(len(shape), int)
    offset[a] = 1
    dots = [enc[p] @ enc[tuple(np.add(p, offset))] for p in coords
            if p[a] + 1 < shape[a]]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-5)


def test_sinusoidal_bad_dim():
  with pytest.raises(ValueError, match="divisible by 2 \\* num_axes = 4"):
    sinusoidal_position_encoding((4, 4), 6)
  with pytest.raises(ValueError, match="spatial_shape"):
    sinusoidal_position_encoding((2, 2, 2, 2), 16)


def test_learned_position_embedding_adds_parameter():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 8))
  module = LearnedPositionEmbedding()
  params = module.init(jax.random.PRNGKey(1), x)
  emb = params["params"]["embedding"]
  assert emb.shape == (3, 4, 8) and float(jnp.abs(emb).max()) > 0
  np.testing.assert_allclose(module.apply(params, x), x + emb[None], rtol=1e-6)
  out = jax.jit(module.apply)(params, x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="batch"):
    module.init(jax.random.PRNGKey(1), jnp.zeros((3, 8)))


@pytest.mark.parametrize("window", [(3, 3), (2, 3, 2)])
def test_relative_position_bias_brute_force(window):
  module = RelativePositionBias(num_heads=2, window_size=window)
  params = module.init(jax.random.PRNGKey(0))
  table = np.asarray(params["params"]["relative_position_bias_table"])
  sizes = [2 * w - 1 for w in window]
  assert table.shape == (np.prod(sizes), 2)
  bias = np.asarray(jax.jit(module.apply)(params))
  tokens = list(itertools.product(*[range(w) for w in window]))
  assert bias.shape == (2, len(tokens), len(tokens))
  full = table.reshape(*sizes, 2)
  for i, p in enumerate(tokens):
    for j, r in enumerate(tokens):
      offset = tuple(pa - ra + w - 1 for pa, ra, w in zip(p, r, window))
      np.testing.assert_array_equal(bias[:, i, j], full[offset])


def test_relative_position_bias_int_window_and_errors():
  bias = RelativePositionBias(3, 4).init_with_output(jax.random.PRNGKey(0))[0]
  assert bias.shape == (3, 16, 16)
  with pytest.raises(ValueError, match="window_size"):
    RelativePositionBias(3, (2, 2, 2, 2)).init(jax.random.PRNGKey(0))
