"""Attention maps on constructed q/k: the map must point where the weights point.

Keys are one-hot (key m = e_m, head_dim = number of tokens) and the query is
a scaled one-hot on the target key, so the query prefers that key by a wide
margin. Each geometry's expected support (which keys the query may see) is
written out by hand; the expected map is a brute-force softmax over it.
"""
import itertools
import json
import os

import numpy as np
import pytest

from medgen_jax.inference import attention_maps as am

G = 8  # token grid side
N = G * G


def constructed(query, key, strength=8.0):
  k = np.eye(N, dtype=np.float32).reshape(G, G, 1, N)
  q = np.zeros((G, G, 1, N), np.float32)
  q[query][0, np.ravel_multi_index(key, (G, G))] = strength * np.sqrt(N)
  return q, k


def brute_force(q, k, query, support):
  """Softmax of query . key / sqrt(d) over the hand-written support."""
  out = np.zeros((G, G))
  logits = np.array([q[query][0] @ k[s][0] / np.sqrt(N) for s in support])
  w = np.exp(logits - logits.max())
  for s, v in zip(support, w / w.sum()):
    out[s] += v
  return out


def square(rows, cols):
  return [(r, c) for r in rows for c in cols]


CASES = [
    # name, attention, window, shift, query, key, support
    ("full", "full", (), (), (2, 3), (6, 1), square(range(G), range(G))),
    ("window", "window", (4, 4), (0, 0), (5, 6), (7, 4), square(range(4, 8), range(4, 8))),
    # Shift 2: the window holding (3, 3) is rows/cols 2..5, not 0..3.
    ("shifted", "window_shifted", (4, 4), (2, 2), (3, 3), (5, 2), square(range(2, 6), range(2, 6))),
    # The rolled window at the border holds rows/cols {6, 7, 0, 1}; the Swin
    # region mask keeps (7, 7) with {6, 7} even though the key it prefers,
    # (0, 0), sits in the same rolled window.
    ("shifted_border", "window_shifted", (4, 4), (2, 2), (7, 7), (0, 0), square((6, 7), (6, 7))),
    ("shifted_border_other_side", "window_shifted", (4, 4), (2, 2), (0, 1), (1, 0),
     square((0, 1), (0, 1))),
]


@pytest.mark.parametrize("name, attention, window, shift, query, key, support", CASES,
                         ids=[c[0] for c in CASES])
def test_window_and_full_geometry(name, attention, window, shift, query, key, support):
  q, k = constructed(query, key)
  a = am.attention_matrix(q, k, attention=attention, window=window, shift=shift)
  row = a[0, np.ravel_multi_index(query, (G, G))].reshape(G, G)
  expected = brute_force(q, k, query, support)
  np.testing.assert_allclose(row, expected, atol=1e-5)
  outside = np.ones((G, G), bool)
  for s in support:
    outside[s] = False
  assert np.all(row[outside] == 0.0)  # exactly the keys the query attended to
  peak = key if key in support else None
  if peak is not None:
    assert np.unravel_index(np.argmax(row), row.shape) == peak
    # Rendered at image resolution (32 x 32 pixels, 4 per token), the argmax
    # lands in the key's pixel block.
    heat = am.upsample(row, (32, 32))
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert (y // 4, x // 4) == key


def test_axial_geometry():
  query, key = (2, 3), (2, 7)
  q, k = constructed(query, key)
  a = am.attention_matrix(q, k, attention="axial")
  row = a[0, np.ravel_multi_index(query, (G, G))].reshape(G, G)
  # Mean of a softmax along row 2 and one along column 3.
  expected = 0.5 * (brute_force(q, k, query, [(2, c) for c in range(G)])
                    + brute_force(q, k, query, [(r, 3) for r in range(G)]))
  np.testing.assert_allclose(row, expected, atol=1e-5)
  assert np.unravel_index(np.argmax(row), row.shape) == key
  off_line = [(r, c) for r, c in itertools.product(range(G), range(G)) if r != 2 and c != 3]
  assert all(row[p] == 0.0 for p in off_line)


def test_rows_sum_to_one_with_bias():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(G, G, 2, 16)).astype(np.float32)
  k = rng.normal(size=(G, G, 2, 16)).astype(np.float32)
  bias = rng.normal(size=(2, 16, 16)).astype(np.float32)
  for attention, kw in (("full", {}), ("axial", {}),
                        ("window_shifted", dict(window=(4, 4), shift=(2, 2), bias=bias))):
    a = am.attention_matrix(q, k, attention=attention, **kw)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)


def test_query_token_and_errors():
  assert am.query_token((31, 0), (32, 32), (8, 8)) == (7, 0)
  assert am.query_token((16, 15), (32, 32), (16, 16)) == (8, 7)
  with pytest.raises(ValueError, match="outside"):
    am.query_token((32, 0), (32, 32), (8, 8))
  with pytest.raises(ValueError, match="unknown attention"):
    am.attention_matrix(np.zeros((4, 4, 1, 2)), np.zeros((4, 4, 1, 2)), attention="linear")


def test_rollout_hand_computed():
  a1 = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)  # grid (1, 2): swap
  a2 = np.eye(4, dtype=np.float32)                       # grid (2, 2)
  r = am.rollout([a1, a2], [(1, 2), (2, 2)])
  # (0.5 a2 + 0.5 I) = I; fine token (i, j) came from coarse (0, j); then a1'.
  a1p = 0.5 * a1 + 0.5 * np.eye(2)
  u = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)
  np.testing.assert_allclose(r, u @ a1p)
  np.testing.assert_allclose(r.sum(-1), 1.0)


@pytest.mark.slow  # ~20 s alone, over a minute on the shared CPU
def test_end_to_end_maps(tmp_path):
  from configs import phantom_gan
  from test_inference_sample import write_checkpoint
  config = phantom_gan.get_config("quick")
  workdir = str(tmp_path / "run")
  write_checkpoint(config, workdir)
  out = str(tmp_path / "maps")
  with pytest.raises(ValueError, match="outside"):
    am.attention_maps(config, workdir, query=(40, 3), out_dir=out)
  report = am.attention_maps(config, workdir, query=(20, 9), out_dir=out)
  with open(os.path.join(out, "attention_maps.json")) as f:
    assert json.load(f) == report
  layers = report["layers"]
  assert [l["attention"] for l in layers] == ["window_shifted"] * len(layers)
  for l in layers:
    assert os.path.getsize(os.path.join(out, l["file"])) > 0
    # A window layer attends within one window at most.
    assert 0 < l["support_tokens"] <= np.prod(l["window"])
  assert layers[0]["grid"] == [8, 8] and layers[0]["query_token"] == [5, 2]
  for name in ("rollout.png", "condition_gate.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
