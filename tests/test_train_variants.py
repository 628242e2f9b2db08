"""Every attention choice and the CNN baseline train from their real quick configs.

`configs/phantom_gan.py:quick,attention=NAME` and `:quick,cnn` go through the
whole `train_and_evaluate` path (dataset, teacher, jit step, checkpoints,
samples) for two steps. The deeper end-to-end check of one run (metrics rows,
TensorBoard, keep-N) is tests/test_train_loop.py; what is checked here is
that each choice builds, takes real gradient steps that change both
networks, and writes the outputs the loop promises.
"""
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import phantom_gan
from medgen_jax.train import train_and_evaluate

# Five real GAN compilations: minutes on the 2-core CPU, so -m slow (the
# default suite is at CI's 15-minute limit).
pytestmark = pytest.mark.slow

VARIANTS = ("attention=full", "attention=axial", "attention=window",
            "attention=window_shifted", "cnn")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  # One dataset (and one cached condition teacher beside it) for all cases.
  return str(tmp_path_factory.mktemp("tfds"))


def _restore(path):
  return ocp.StandardCheckpointer().restore(path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_quick_variant_trains_two_steps(variant, data_dir, tmp_path):
  config = phantom_gan.get_config(f"quick,{variant}")
  config.data.data_dir = data_dir
  # One compiled step (R1 every step) and checkpoints at both steps, so the
  # first update can be compared with the second.
  config.train.update(num_steps=2, checkpoint_every=1, sample_every=2)
  config.loss.r1_every = 1
  summary = train_and_evaluate(config, str(tmp_path))

  assert summary["steps"] == 2 and not summary["preempted"]
  saved = json.load(open(tmp_path / "config.json"))["model"]
  assert (saved["generator"], saved["attention"]) == (
      ("cnn", config.model.attention) if variant == "cnn"
      else ("transformer", variant.split("=")[1]))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    for key in ("d_loss", "g_loss", "g_teacher", "g_grad_norm", "d_grad_norm"):
      assert np.isfinite(r[key]), (key, r)
    assert r["g_grad_norm"] > 0 and r["d_grad_norm"] > 0
  # The second step changed both networks' weights (a step that computed
  # losses but applied no update would leave them equal).
  ckpt = tmp_path / "checkpoints"
  first, second = (_restore(str(ckpt / s / "state")) for s in ("1", "2"))
  for name in ("g_params", "d_params"):
    moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(first[name]), jax.tree.leaves(second[name]))]
    assert max(moved) > 0, name
  assert (tmp_path / "samples" / "step_000002.png").exists()
