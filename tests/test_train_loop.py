"""The training loop: NaN stop without saving, outputs, and the real end-to-end quick run."""
import json

import numpy as np
import pytest

from conftest import INFO, TinyD, TinyG, tiny_iterator, tiny_loop_config
from medgen_jax.train import train_and_evaluate
from medgen_jax.train.loop import run_training


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  # Unshuffled, batch 8: example 16 lands in the third batch (step 3).
  config = tiny_loop_config(num_steps=5)
  with pytest.raises(FloatingPointError, match="at step 3 .*step 2\\) is intact"):
    run_training(config, str(tmp_path), info=INFO, generator=TinyG(), discriminator=TinyD(),
                 iterator=tiny_iterator(shuffle=False, nan_at=16))
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [1, 2]
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["d_loss"]) and np.isfinite(r["g_loss"]) for r in rows)


@pytest.mark.slow  # compiles the real Ti transformer GAN: minutes on a loaded 2-core CPU
def test_quick_config_end_to_end(tmp_path):
  from configs import phantom_gan
  config = phantom_gan.get_config("quick")
  config.data.data_dir = str(tmp_path / "tfds")
  summary = train_and_evaluate(config, str(tmp_path / "run"))
  run = tmp_path / "run"
  assert summary["steps"] == config.train.num_steps and not summary["preempted"]
  rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r[k]) for r in rows for k in ("d_loss", "g_loss", "d_real"))
  assert json.load(open(run / "summary.json"))["steps"] == 3
  assert json.load(open(run / "config.json"))["model"]["variant"] == "Ti"
  assert (run / "samples" / "step_000003.png").exists()
  assert list((run / "tensorboard").iterdir())
  assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]


def test_teacher_never_shares_the_evaluation_extractors_directory(tmp_path):
  import jax
  from configs import phantom_gan
  from medgen_jax import classifier
  from medgen_jax import data as data_lib
  from medgen_jax.eval import reference, settings
  from medgen_jax.train.loop import build_teacher
  config = phantom_gan.get_config("quick")
  config.eval.update(extractor_path=str(tmp_path / "extractor"), extractor_steps=2)
  with config.unlocked():
    config.eval.update(extractor_widths=(4,), extractor_feature_dim=4,
                       extractor_batch_size=4)
  config.teacher.update(widths=(4,), feature_dim=4, batch_size=4)
  info = data_lib.load_info(config.data)
  teacher, params = build_teacher(config, info)
  assert not (tmp_path / "extractor").exists()
  # The teacher is config.teacher's recipe, whatever config.eval says.
  assert (teacher.widths, teacher.feature_dim) == ((4,), 4)
  config.eval.update(extractor_widths=(8,), extractor_feature_dim=8)
  assert build_teacher(config, info, trained=False)[0] == teacher
  # The evaluation then trains and caches its own extractor at its path
  # (the teacher there would be refused as trained for other settings).
  s = settings.eval_settings(config)
  train, _ = reference.load_real(config.data, s)
  _, _, meta = classifier.get_classifier(settings.extractor_recipe(s), config.data, info,
                                         train=train, path=s["extractor_path"])
  assert meta["reused"] is False and meta["path"] == str(tmp_path / "extractor")
  # The untrained teacher (for cost measurement) has the trained one's shapes.
  fresh, fresh_params = build_teacher(config, info, trained=False)
  assert fresh == teacher
  assert jax.tree.map(np.shape, fresh_params) == jax.tree.map(np.shape, params)
  config.loss.teacher_weight = 0.0
  assert build_teacher(config, info) is None


def test_teacher_is_trained_on_the_fields_it_teaches_only():
  import jax
  from configs import phantom_gan
  from medgen_jax import data as data_lib
  from medgen_jax.train.loop import build_teacher
  config = phantom_gan.get_config("quick")
  config.teacher.update(widths=(4,), feature_dim=4, batch_size=4)
  info = data_lib.load_info(config.data)
  full, full_params = build_teacher(config, info)
  config.teacher.fields = "lesion"
  teacher, params = build_teacher(config, info)
  assert [f.name for f in full.fields] == [f.name for f in info.conditions]
  assert [f.name for f in teacher.fields] == ["lesion"]
  assert sorted(k for k in params if k.startswith("head_")) == ["head_lesion"]
  # A separate cache entry: the all-conditions teacher is still there intact.
  config.teacher.fields = ""
  restored, restored_params = build_teacher(config, info)
  assert restored == full
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, restored_params, full_params)))
  fresh, _ = build_teacher(config, info, trained=False)
  config.teacher.fields = "lesion"
  assert build_teacher(config, info, trained=False)[0] == teacher != fresh
