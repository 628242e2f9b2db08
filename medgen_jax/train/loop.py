"""`train_and_evaluate(config, workdir)`: the GAN training loop.

Validate the config (before any compilation) -> data -> models -> device
layout -> restore the latest checkpoint if any -> loop (progress bar,
metrics.jsonl + TensorBoard, EMA sample grids, checkpoints, SIGTERM) ->
summary.json.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from medgen_jax import classifier
from medgen_jax import data as data_lib
from medgen_jax import models as models_lib
from medgen_jax import viz
from medgen_jax.attention import check_window, get_attention
from medgen_jax.data import builders
from medgen_jax.train import augment as augment_lib
from medgen_jax.train import checkpoint as ckpt_lib
from medgen_jax.train import flow
from medgen_jax.train import logging as log_lib
from medgen_jax.train import losses
from medgen_jax.train import parallel
from medgen_jax.train import state as state_lib
from medgen_jax.train import step as step_lib
from medgen_jax.train import translation
from medgen_jax.train import variety as variety_lib

SAMPLE_COLS = 8
TASKS = translation.TASKS + flow.TASKS
# Per task: (config, models, info) -> the step and init of `parallel.build_trainer`.
TRAINER_HOOKS = {"generation": step_lib.trainer_hooks, "translation": translation.trainer_hooks,
                 "flow": flow.trainer_hooks}
LOSS_KEYS = ("d_loss", "g_loss", "r1", "r2", "d_real", "d_fake", "recon_l1", "d_cond", "g_cond",
             "g_teacher", "g_teacher_real", "g_diversity", "flow_loss")


def teacher_recipe(config: Any) -> classifier.Recipe:
  """The condition teacher's recipe, `config.teacher` (validated)."""
  return classifier.from_section(config.teacher, name="teacher")


def teacher_weight(config: Any, condition_names: tuple[str, ...] | None) -> float:
  """`loss.teacher_weight`; None (configs/folder_gan.py's default) means
  "on when the dataset has conditions": 1.0 with condition fields (or when
  they are only known after the build), 0.0 without."""
  if task_of(config) == "flow":  # the flow objective has no teacher
    return 0.0
  weight = config.loss.teacher_weight
  if weight is None:
    return 0.0 if condition_names == () else 1.0
  return float(weight)


def _no_conditions_hint(data_config: Any) -> str:
  if data_config.get("name") != "medical_folder":
    return f"dataset {data_config.get('name')!r} has no condition fields"
  if not data_config.get("labels_csv"):
    return ("the dataset has no conditions: data.labels_csv is not set (give "
            "--config.data.labels_csv=labels.csv to condition on its columns)")
  return (f"the dataset has no conditions: the labels CSV {data_config.labels_csv} has "
          f"only the subject column {data_config.get('subject_column')!r}")


def check_condition_settings(config: Any, names: tuple[str, ...] | None) -> None:
  """Settings that need condition fields, against the dataset's `names`
  (`data.condition_names`: declared, or the labels CSV header; None = known
  only after the build, then `build_teacher` checks). One ValueError naming
  the setting and what to change."""
  if names is None:
    return
  weight = teacher_weight(config, names)
  if weight and not names:
    raise ValueError(
        f"loss.teacher_weight {weight} needs conditions to teach, but "
        f"{_no_conditions_hint(config.data)}; set --config.loss.teacher_weight=0")
  unknown = sorted(set(teacher_recipe(config).fields) - set(names)) if weight else []
  if unknown:
    raise ValueError(f"teacher.fields names {unknown}, which are not conditions of "
                     f"the dataset (it has {list(names)}); fix --config.teacher.fields "
                     f"('' = all)")
  if float(config.loss.condition_weight) > 0 and not names:
    raise ValueError(
        f"loss.condition_weight {config.loss.condition_weight} (the discriminator's "
        f"condition heads) needs conditions, but {_no_conditions_hint(config.data)}; set "
        f"--config.loss.condition_weight=0 --config.model.d_condition_heads=False")


def make_trainer(config: Any, models: state_lib.Models, info: data_lib.DatasetInfo,
                 devices=None) -> parallel.Trainer:
  """`parallel.build_trainer` for `config.task`: the task's step on its
  sections (`TRAINER_HOOKS`) and the parallel, train and model settings."""
  hooks = TRAINER_HOOKS[task_of(config)](config, models, info)
  return parallel.build_trainer(config.parallel, models, info, devices,
                                global_batch=config.train.batch_size,
                                model_config=config.model, **hooks)


def task_of(config: Any) -> str:
  """`config.task`: 'generation', 'translation' or 'flow' (checked)."""
  task = config.task
  if task not in TASKS:
    raise ValueError(f"unknown config.task {task!r}; expected one of {TASKS}")
  return task


def validate_config(config: Any, num_devices: int) -> None:
  """Cheap checks with one clear ValueError, before data or compilation.

  Model size checks (image size vs token grid, window vs grid, heads vs
  width) are made by `medgen_jax.models.build_generator`, which runs before
  anything is compiled too. Settings that need conditions are checked
  against the dataset's condition names, read without building it
  (`check_condition_settings`).
  """
  t, m = config.train, config.model
  for key in ("num_steps", "batch_size", "log_every", "sample_every", "checkpoint_every",
              "keep_checkpoints"):
    if int(t[key]) < 1:
      raise ValueError(f"train.{key} must be >= 1, got {t[key]}")
  if m.generator == "transformer":
    get_attention(m.attention, "model.attention")
  size = config.data.image_size
  if size % m.token_grid:
    raise ValueError(f"data.image_size {size} is not divisible by model.token_grid "
                     f"{m.token_grid}")
  if m.generator == "transformer":
    # The smallest axis of the first attention stage; build_generator checks every stage.
    check_window(m.attention, m.window_size,
                 (m.token_grid,) * len(builders.spatial_shape(config.data)))
  state_lib.make_schedule(1.0, config.optim, t.num_steps)
  # With the model and the configured volume shape, a mesh.seq > 1 layout is
  # checked against the token grids here, before the dataset is touched.
  mesh = parallel.validate(config.parallel, t.batch_size, num_devices, model_config=m,
                           spatial_shape=builders.spatial_shape(config.data))
  if task_of(config) == "flow":
    flow.validate_flow_config(config)
  else:
    _validate_adversarial(config, mesh)


def _validate_adversarial(config: Any, mesh: dict) -> None:
  """The GAN and translation checks of `validate_config`: the loss section,
  the discriminator's settings and the condition teacher."""
  t, m = config.train, config.model
  losses.get_gan_loss(config.loss.gan)
  augment_lib.parse_policy(config.loss.augment)
  if config.loss.r1_gamma < 0 or config.loss.r2_gamma < 0 or config.loss.r1_every < 1:
    raise ValueError(f"loss.r1_gamma and loss.r2_gamma must be >= 0 and loss.r1_every "
                     f">= 1, got {config.loss.r1_gamma}, {config.loss.r2_gamma}, "
                     f"{config.loss.r1_every}")
  if not 0.0 <= config.loss.ema_decay < 1.0:
    raise ValueError(f"loss.ema_decay must be in [0, 1), got {config.loss.ema_decay}")
  weight, heads = float(config.loss.condition_weight), bool(m.d_condition_heads)
  if weight < 0 or (weight > 0) != heads:
    raise ValueError(
        f"loss.condition_weight {weight} and model.d_condition_heads {heads} disagree: "
        f"the condition-prediction loss (weight > 0) needs the discriminator's heads, "
        f"and heads without the loss (weight 0) would never be trained")
  if config.loss.diversity_weight < 0 or config.loss.diversity_cap <= 0:
    raise ValueError(f"loss.diversity_weight must be >= 0 and loss.diversity_cap > 0, got "
                     f"{config.loss.diversity_weight}, {config.loss.diversity_cap}")
  names = (builders.condition_names(config.data) if config.task == "generation" else None)
  weight = teacher_weight(config, names)
  if weight < 0:
    raise ValueError(f"loss.teacher_weight must be >= 0, got {weight}")
  if weight and config.task != "generation":
    raise ValueError(f"loss.teacher_weight {weight} applies to the generation "
                     f"task only; set it to 0 for task {config.task!r}")
  check_condition_settings(config, names)
  margin = config.loss.teacher_margin
  if margin not in losses.TEACHER_MARGINS:
    raise ValueError(f"loss.teacher_margin must be one of {losses.TEACHER_MARGINS}, got "
                     f"{margin!r}")
  if weight:
    teacher_recipe(config)
  group = int(m.d_minibatch_std)
  per_device = t.batch_size // mesh[parallel.DATA_AXIS]
  if group < 0 or (group and per_device % group):
    raise ValueError(f"model.d_minibatch_std {group} must be 0 (off) or divide the "
                     f"per-device batch {per_device} (train.batch_size "
                     f"{t.batch_size} over {mesh[parallel.DATA_AXIS]} 'data' devices)")


def _host_batch(batch: dict, info) -> dict[str, np.ndarray]:
  """The arrays the step consumes: the image and the DatasetInfo conditions."""
  return {"image": batch["image"], **{f.name: batch[f.name] for f in info.conditions}}


def _check_finite(pending: list, latest_ckpt: int | None) -> None:
  for step, m in pending:
    if not bool(m["is_finite"]):
      bad = {k: float(v) for k, v in m.items() if k != "is_finite"}
      raise FloatingPointError(
          f"non-finite loss or gradient at step {step + 1} (metrics {bad}); training "
          f"stopped without saving, the last good checkpoint (step {latest_ckpt}) is intact")


def _to_numpy(x: jax.Array) -> np.ndarray:
  """Host copy of a replicated (possibly multi-host) array."""
  return np.asarray(x.addressable_data(0))


def train_and_evaluate(config: Any, workdir: str) -> dict:
  """Trains the GAN described by `config`, writing everything under `workdir`.

  Resumes from the newest checkpoint in `workdir/checkpoints` if one exists.

  Returns:
    The summary written to workdir/summary.json: steps, start_step,
    wall_time_s, images_per_s, last losses, preempted.
  """
  parallel.maybe_initialize_distributed(config.parallel)
  validate_config(config, jax.device_count())
  # Before the data: a second run on this workdir stops here, not after a build.
  with (ckpt_lib.workdir_lock(workdir) if jax.process_index() == 0
        else contextlib.nullcontext()):
    return _build_and_train(config, workdir)


def _build_and_train(config: Any, workdir: str) -> dict:
  """`train_and_evaluate` after validation, holding the workdir lock."""
  info = data_lib.load_info(config.data)
  if task_of(config) != "flow" and config.loss.teacher_weight is None:  # auto: recorded in config.json
    config.loss.teacher_weight = teacher_weight(config, tuple(f.name for f in info.conditions))
  generator = models_lib.build_generator(config.model, info)
  # Flow matching trains the velocity network alone (train/flow.py).
  discriminator = (None if task_of(config) == "flow" else
                   models_lib.build_discriminator(config.model, info))
  t = config.train
  iterator, _ = data_lib.load_dataset(
      config.data, split="train", batch_size=t.batch_size // jax.process_count(),
      seed=t.seed, process_index=jax.process_index(), process_count=jax.process_count())
  return run_training(config, workdir, info=info, generator=generator,
                      discriminator=discriminator, iterator=iterator,
                      teacher=build_teacher(config, info))


def build_teacher(config: Any, info, *, trained: bool = True
                  ) -> tuple[Any, Any] | None:
  """The frozen condition teacher `(FeatureNet, params)`, or None when
  `loss.teacher_weight` is 0.

  Trained from `config.teacher` (`teacher_recipe`) on the real train split on
  first use and cached beside the dataset under a key of the dataset and the
  recipe (`classifier.get_classifier`). With `teacher.fields` set it is
  trained on those conditions only, and its loss covers them only.

  With `trained=False` the teacher has the same architecture and fresh
  weights and no data is read: what the step costs does not depend on the
  weights (`medgen_jax.bench.train_step`).
  """
  if not teacher_weight(config, tuple(f.name for f in info.conditions)):
    return None
  check_condition_settings(config, tuple(f.name for f in info.conditions))
  recipe = teacher_recipe(config)
  if not trained:
    return classifier.init_classifier(recipe, info)
  model, params, meta = classifier.get_classifier(recipe, config.data, info)
  logging.info("condition teacher %s (%s)", meta["path"],
               "reused" if meta["reused"] else "trained")
  return model, params


def run_training(config: Any, workdir: str, *, info, generator, discriminator,
                 iterator, teacher: tuple[Any, Any] | None = None) -> dict:
  """The loop of `train_and_evaluate` for already built networks and data.

  Args:
    config: validated experiment config (train, optim, loss, parallel, model.latent_dim).
    workdir: output directory; resumes from workdir/checkpoints if present.
    info: DatasetInfo of the data.
    generator, discriminator: linen modules following the models interface.
    iterator: this process's batches (dicts with 'image' `[B / processes, ...]` and
      the info's condition fields) with JSON-able get_state()/set_state().
    teacher: frozen condition classifier for `loss.teacher_weight`
      (`build_teacher`).

  Returns:
    The summary dict (also written to workdir/summary.json).
  """
  models = state_lib.make_models(generator, discriminator, config, teacher=teacher)
  task = task_of(config)
  trainer = make_trainer(config, models, info)
  it = iterator
  t = config.train
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  manager = ckpt_lib.make_manager(ckpt_lib.checkpoint_dir(workdir),
                                  keep=t.keep_checkpoints)
  restored = ckpt_lib.restore_latest(
      manager, ckpt_lib.abstract_with_sharding(trainer.abstract_state, trainer.state_sharding))
  if restored is None:
    state, start = trainer.init_state(), 0
  else:
    global_state, data_state, start = restored
    state = trainer.put_state(global_state)
    it.set_state(data_state)

  # Fixed noise and one row per condition value, for comparable grids over time
  # (for flow runs the noise is the image at t = 1 and the generator's call
  # integrates the ODE: models.velocity.FlowGenerator).
  sample_cond, row_labels = viz.grid_conditions(info, SAMPLE_COLS)
  num_samples = len(row_labels) * SAMPLE_COLS
  sample_z = jax.random.normal(jax.random.PRNGKey(t.seed + 1),
                               (num_samples, config.model.latent_dim))
  sample_fn = jax.jit(lambda p, s: generator.apply({"params": p, **s}, sample_z,
                                                   sample_cond, train=False))
  sample_dir = os.path.join(workdir, "samples")
  # Collapse as it happens: the grid's same-row variety vs the real batches'.
  meter = (variety_lib.VarietyMeter(viz.row_condition(info))
           if task in ("generation", "flow") else None)
  variety = {}
  if task == "translation":  # rows: real pairs | translated, on the latest batch
    row_labels = list(translation.SAMPLE_ROWS)
    translate_fn = translation.make_sample_fn(generator, config, info)
    sample_fn = lambda p, s: translate_fn(p, s, host_batch)

  def write_samples(step, placed_state):
    host = trainer.get_state(placed_state)
    images = _to_numpy(sample_fn(host.ema_params, host.g_state))
    if meter is not None:
      variety.update(meter.score(images, sample_cond))
    if is_main:
      os.makedirs(sample_dir, exist_ok=True)
      viz.save_grid(images, info, os.path.join(sample_dir, f"step_{step:06d}.png"),
                    row_labels=row_labels, title=f"EMA generator, step {step}")

  def save(step, placed_state):
    ckpt_lib.save(manager, step, trainer.get_state(placed_state), it.get_state())

  writer = log_lib.MetricWriter(workdir, enabled=is_main)
  bar = log_lib.progress_bar(t.num_steps, start, enabled=is_main)
  pending, last, preempted = [], {}, False
  last_penalties = {}
  t_start = time.perf_counter()
  t_steady, steady_from = None, start
  step = start
  try:
    with ckpt_lib.sigterm_flag() as sigterm:
      while step < t.num_steps:
        host_batch = _host_batch(next(it), info)
        if meter is not None:
          meter.add_real(host_batch)
        batch = trainer.put_batch(host_batch)
        with_r1 = task != "flow" and step_lib.r1_due(config.loss, step)
        state, metrics = trainer.step(state, batch, with_r1=with_r1)
        pending.append((step, metrics))
        if with_r1:
          last_penalties = {k: metrics[k] for k in ("r1", "r2")}
        step += 1
        bar.update(1)
        if t_steady is None:  # exclude compilation from the throughput
          jax.block_until_ready(metrics)
          t_steady, steady_from = time.perf_counter(), step
        due_ckpt = step % t.checkpoint_every == 0 or step == t.num_steps or sigterm.is_set()
        due_samples = step % t.sample_every == 0 or step == t.num_steps
        if step % t.log_every == 0 or due_ckpt or due_samples:
          pending = jax.device_get(pending)
          _check_finite(pending, manager.latest_step())
          last = {k: float(pending[-1][1][k]) for k in pending[-1][1] if k != "is_finite"}
          if last_penalties:  # the latest lazy-penalty values, not a skipped step's 0
            last.update({k: float(v) for k, v in last_penalties.items()})
          pending = []
          if due_samples:  # before the log row, so that it carries this grid's variety
            write_samples(step, state)
          elapsed = time.perf_counter() - t_steady
          ips = (step - steady_from) * t.batch_size / elapsed if elapsed > 0 else 0.0
          if step % t.log_every == 0 or step == t.num_steps:
            writer.write(step, {**last, **variety, "images_per_s": ips})
            bar.set_postfix(**{k: f"{last[k]:.3f}" for k in ("d_loss", "g_loss", "flow_loss")
                               if k in last}, img_s=f"{ips:.1f}")
        if due_ckpt:
          save(step, state)
        if sigterm.is_set():
          preempted = True
          break
  finally:
    bar.close()
    writer.close()
    manager.close()

  wall = time.perf_counter() - t_start
  steady = time.perf_counter() - t_steady if t_steady is not None else 0.0
  summary = dict(
      steps=step, start_step=start, wall_time_s=wall,
      images_per_s=(step - steady_from) * t.batch_size / steady if steady > 0 else 0.0,
      last_losses={k: last.get(k) for k in LOSS_KEYS if k in last},
      last_metrics=last, variety=variety, preempted=preempted,
      workdir=os.path.abspath(workdir))
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
