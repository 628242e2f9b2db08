"""Training the condition classifier: a small CNN that predicts the conditions.

ImageNet-Inception features are poorly calibrated for medical images (and its
weights cannot be loaded here), so the project trains its own extractor on the
real training split of each dataset: a ResNet-ish classifier with one head per
condition field (`DatasetInfo.conditions`):

- categorical fields (lesion, site): logits, softmax cross-entropy;
  label -1 (unknown) is masked out;
- continuous fields (age): regression of the value normalised to [0, 1] over
  the field's `value_range`, squared error; NaN (unknown) is masked out.

A dataset without conditions (a folder without a labels CSV) trains the same
network on a label-free pretext task instead (`train_pretext_extractor`):
predicting which of four in-plane rotations (0, 90, 180, 270 degrees) was
applied to a real train image. Telling them apart needs the anatomy's
layout (which way is anterior, where the spine sits), not just grey-level
statistics, so the features describe what a scan looks like without any
label; the rotated copies are seen in training only, features are always
taken of unrotated images.

Its penultimate activations `[N, feature_dim]` define the domain Fréchet
distance, KID and the k-NN manifold metrics; its heads judge condition
fidelity, teach the GAN and pick best-of-K samples. Each use trains its own
network from its own `medgen_jax.classifier.recipe.Recipe`, saved with orbax
(`save_extractor`) and reused (`load_extractor`);
`medgen_jax.classifier.cache` keys that cache by dataset and recipe.

Inputs are model-range images in [-1, 1], `[B, H, W, C]` (2D convolutions) or
`[B, D, H, W, C]` (3D: the same architecture with 3D convolutions; the
dimensionality is taken from the input rank, so an extractor is trained for
one rank). GroupNorm (no batch statistics) keeps every sample's features
independent of the rest of its batch, so features do not depend on batch size.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from medgen_jax.classifier.network import (POOLINGS, FeatureNet, condition_loss,
                                           condition_targets)
from medgen_jax.data.info import CATEGORICAL, ConditionField


def _check_images(images) -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim not in (4, 5):
    raise ValueError(f"images must be [N, H, W, C] or [N, D, H, W, C] in "
                     f"[-1, 1], got shape {images.shape}")
  if images.shape[0] < 1:
    raise ValueError("images is empty")
  return images


ARCHITECTURE_KEYS = ("widths", "feature_dim", "stem_patch", "pooling")


def make_extractor(fields: Sequence[ConditionField], *,
                   widths: Sequence[int] = (16, 32, 64), feature_dim: int = 64,
                   stem_patch: int = 1, pooling: str = "mean") -> FeatureNet:
  """A `FeatureNet` after checking its architecture settings (see its fields)."""
  if not widths or min(widths) < 1 or feature_dim < 1:
    raise ValueError(f"extractor widths and feature_dim must be positive, got "
                     f"{tuple(widths)}, {feature_dim}")
  if stem_patch < 1:
    raise ValueError(f"extractor stem_patch must be >= 1, got {stem_patch}")
  if pooling not in POOLINGS:
    raise ValueError(f"extractor pooling must be one of {POOLINGS}, got {pooling!r}")
  return FeatureNet(fields=tuple(fields), widths=tuple(int(w) for w in widths),
                    feature_dim=int(feature_dim), stem_patch=int(stem_patch),
                    pooling=pooling)


def init_extractor(fields: Sequence[ConditionField], input_shape: Sequence[int],
                   *, seed: int, **architecture) -> tuple[FeatureNet, dict]:
  """An untrained `FeatureNet` and its params for images of `input_shape`.

  Args:
    fields: condition fields, one head each.
    input_shape: one image's `(H, W, C)` or `(D, H, W, C)`.
    seed: initialisation seed.
    **architecture: `make_extractor` keywords (widths, feature_dim,
      stem_patch, pooling).
  """
  if len(input_shape) not in (3, 4):
    raise ValueError(f"input_shape must be one image's (H, W, C) or "
                     f"(D, H, W, C), got {tuple(input_shape)}")
  model = make_extractor(fields, **architecture)
  # Jitted init with an 'rbg' key: compiling threefry for every initializer
  # costs ~20 s of CPU for this small net, XLA's RngBitGenerator ~4 s.
  # Seeded and deterministic per platform.
  params = _init(model, jax.random.key(seed, impl="rbg"),
                 jnp.zeros((1, *input_shape), jnp.float32))
  return model, params["params"]


# Module-level jits with the (hashable) model static: repeated trainings of the
# same architecture (downstream seeds, evaluation reruns) compile once.
_init = jax.jit(lambda model, key, x: model.init(key, x), static_argnums=0)


def _optimizer(lr: float, warmup: int, steps: int) -> optax.GradientTransformation:
  return optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup, max(steps, warmup + 1)), weight_decay=1e-4)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(model, schedule: tuple[float, int, int], params, opt_state, x, t):
  (loss, metrics), grads = jax.value_and_grad(
      lambda p: condition_loss(model, p, x, t), has_aux=True)(params)
  updates, opt_state = _optimizer(*schedule).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, {"loss": loss, **metrics}


def _normalised_targets(conditions: Mapping[str, np.ndarray],
                        fields: Sequence[ConditionField],
                        n: int) -> dict[str, np.ndarray]:
  targets = {}
  for f in fields:
    if f.name not in conditions:
      raise ValueError(f"conditions lack field {f.name!r}; have "
                       f"{sorted(conditions)}")
    v = np.asarray(conditions[f.name]).reshape(-1)
    if v.shape[0] != n:
      raise ValueError(f"condition {f.name!r} has {v.shape[0]} values for "
                       f"{n} images")
    if f.kind == CATEGORICAL and np.any(v >= f.num_classes):
      raise ValueError(f"condition {f.name!r}: class index >= num_classes "
                       f"{f.num_classes}")
    targets[f.name] = v
  return {k: np.asarray(v) for k, v in condition_targets(targets, fields).items()}


PRETEXT_ROTATION = ConditionField("pretext_rotation", CATEGORICAL, 4,
                                  ("0", "90", "180", "270"))


def rotate_in_plane(images: np.ndarray, quarter_turns: np.ndarray) -> np.ndarray:
  """Each image `[N, *spatial, C]` turned by its `quarter_turns[i]` x 90 degrees in (H, W).

  The H and W axes are the last two spatial ones, so volumes `[N, D, H, W, C]`
  turn about their depth axis. Images must be square in (H, W).
  """
  images = np.asarray(images)
  h, w = images.shape[-3:-1]
  if h != w:
    raise ValueError(f"in-plane rotation needs square images, got {h}x{w}")
  return np.stack([np.rot90(x, int(k), axes=(-3, -2)) for x, k in zip(images, quarter_turns)])


def _fit(model_fields, images: np.ndarray, batch_fn, *, steps: int, seed: int, lr: float,
         architecture: Mapping) -> tuple[FeatureNet, dict, list[dict[str, float]]]:
  """AdamW with cosine decay on `batch_fn(rng) -> (x, targets)` for `steps` steps."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  model, params = init_extractor(model_fields, images.shape[1:], seed=seed, **architecture)
  schedule = (float(lr), min(10, steps // 4), int(steps))
  opt_state = _optimizer(*schedule).init(params)
  rng = np.random.default_rng(seed)
  history = []
  for _ in range(steps):
    x, targets = batch_fn(rng)
    params, opt_state, metrics = _train_step(
        model, schedule, params, opt_state, jnp.asarray(x),
        {k: jnp.asarray(v) for k, v in targets.items()})
    history.append({k: float(v) for k, v in metrics.items()})
  return model, params, history


def train_pretext_extractor(images, *, steps: int, batch_size: int, seed: int,
                            lr: float = 1e-3, **architecture
                            ) -> tuple[FeatureNet, dict, list[dict[str, float]]]:
  """Trains the extractor without labels: rotation prediction on real images.

  Args:
    images: `[N, H, W, C]` or `[N, D, H, W, C]` real images in [-1, 1], H == W.
    steps, batch_size, seed, lr, **architecture: as `train_feature_extractor`.

  Returns:
    (model, params, history); the model has one 4-class head,
    `PRETEXT_ROTATION`, and history carries its training-batch accuracy.
  """
  images = _check_images(images)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  n = images.shape[0]

  def batch(rng):
    idx = rng.choice(n, batch_size, replace=n < batch_size)
    turns = rng.integers(0, 4, batch_size).astype(np.int32)
    return rotate_in_plane(images[idx], turns), {PRETEXT_ROTATION.name: turns}

  return _fit((PRETEXT_ROTATION,), images, batch, steps=steps, seed=seed, lr=lr,
              architecture=architecture)


def pretext_accuracy(model: FeatureNet, params, images, *, seed: int = 0) -> float:
  """Rotation-prediction accuracy on `images`, each turned by a random quarter turn.

  On the real test split it says whether the label-free extractor learned
  anatomy that holds beyond its train subjects (chance is 0.25).
  """
  images = _check_images(images)
  turns = np.random.default_rng(seed).integers(0, 4, images.shape[0])
  predicted = predict_conditions(model, params, rotate_in_plane(images, turns))
  return float(np.mean(predicted[PRETEXT_ROTATION.name] == turns))


def is_pretext(model: FeatureNet) -> bool:
  """True for an extractor trained by `train_pretext_extractor` (its head is no condition)."""
  return tuple(model.fields) == (PRETEXT_ROTATION,)


def train_feature_extractor(images, conditions: Mapping[str, np.ndarray],
                            fields: Sequence[ConditionField], *, steps: int,
                            batch_size: int, seed: int, lr: float = 1e-3,
                            **architecture
                            ) -> tuple[FeatureNet, dict, list[dict[str, float]]]:
  """Trains the condition classifier on real images.

  Args:
    images: `[N, H, W, C]` or `[N, D, H, W, C]` real images in [-1, 1].
    conditions: {field name: `[N]`} in the data layer's convention
      (categorical int, -1 unknown; continuous physical units, NaN unknown).
    fields: condition fields to predict (at least one).
    steps: optimisation steps (AdamW, cosine decay).
    batch_size: images per step (sampled with a seeded numpy generator).
    seed: seeds initialisation and batch order.
    lr: peak learning rate.
    **architecture: `make_extractor` keywords (widths, feature_dim,
      stem_patch, pooling).

  Returns:
    (model, params, history): `history` is one dict of python floats per step
    (total loss, per-field losses and training-batch accuracies).
  """
  images = _check_images(images)
  fields = tuple(fields)
  if not fields:
    raise ValueError("fields is empty: the extractor needs a condition to learn "
                     "(train_pretext_extractor learns without labels)")
  if steps < 1 or batch_size < 1:
    raise ValueError(f"steps and batch_size must be >= 1, got {steps}, "
                     f"{batch_size}")
  n = images.shape[0]
  targets = _normalised_targets(conditions, fields, n)

  def batch(rng):
    idx = rng.choice(n, batch_size, replace=n < batch_size)
    return images[idx], {k: v[idx] for k, v in targets.items()}

  return _fit(fields, images, batch, steps=steps, seed=seed, lr=lr,
              architecture=architecture)


# The module is a hashable dataclass: static, so one compile per model/shape.
_apply = jax.jit(lambda model, params, images: model.apply(
    {"params": params}, images), static_argnums=0)


def _batched_apply(model: FeatureNet, params, images, batch_size: int):
  images = _check_images(images)
  kernel = params["Conv_0"]["kernel"]  # [*window, C_in * stem_patch**nd, C_out]
  channels = kernel.shape[-2] // model.stem_patch ** (kernel.ndim - 2)
  if images.ndim != kernel.ndim or images.shape[-1] != channels:
    spatial = ", ".join(["..."] * (kernel.ndim - 2))
    raise ValueError(f"extractor expects [N, {spatial}, {channels}] "
                     f"images (its training rank and channels), got shape "
                     f"{images.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  n = images.shape[0]
  bs = min(batch_size, n)
  feats, heads = [], []
  for start in range(0, n, bs):
    block = images[start:start + bs]
    pad = bs - block.shape[0]  # pad the last block: a single compiled shape
    block = np.pad(block, [(0, pad)] + [(0, 0)] * (block.ndim - 1))
    f, h = _apply(model, params, jnp.asarray(block))
    feats.append(np.asarray(f)[:bs - pad])
    heads.append({k: np.asarray(v)[:bs - pad] for k, v in h.items()})
  return (np.concatenate(feats),
          {k: np.concatenate([h[k] for h in heads]) for k in heads[0]})


def extract_features(model: FeatureNet, params, images, *,
                     batch_size: int = 256) -> np.ndarray:
  """Penultimate features `[N, feature_dim]` of `[N, *spatial, C]` in [-1, 1]."""
  return _batched_apply(model, params, images, batch_size)[0]


def predict_conditions(model: FeatureNet, params, images, *,
                       batch_size: int = 256) -> dict[str, np.ndarray]:
  """Predicted conditions `{field: [N]}`: int32 classes, float32 physical values."""
  _, heads = _batched_apply(model, params, images, batch_size)
  out = {}
  for f in model.fields:
    if f.kind == CATEGORICAL:
      out[f.name] = heads[f.name].argmax(-1).astype(np.int32)
    else:
      lo, hi = f.value_range
      out[f.name] = (lo + heads[f.name] * (hi - lo)).astype(np.float32)
  return out


def save_extractor(path: str | os.PathLike, model: FeatureNet, params, *,
                   input_shape: Sequence[int],
                   metadata: Mapping | None = None, force: bool = False) -> str:
  """Saves params (orbax, `path/params`) and architecture (`path/extractor.json`).

  Args:
    path: directory to create.
    model: the trained `FeatureNet`.
    params: its parameters.
    input_shape: one image's shape `(*spatial, C)` (restores the param tree).
    metadata: JSON-able facts to keep beside it (dataset, steps, accuracy).
    force: overwrite an existing checkpoint.

  Returns:
    the absolute directory.
  """
  path = os.path.abspath(os.fspath(path))
  if len(input_shape) not in (3, 4):
    raise ValueError(f"input_shape must be one image's (H, W, C) or (D, H, W, C), "
                     f"got {tuple(input_shape)}")
  spec = {"widths": list(model.widths), "feature_dim": model.feature_dim,
          "stem_patch": model.stem_patch, "pooling": model.pooling,
          "fields": [dataclasses.asdict(f) for f in model.fields],
          "input_shape": [int(s) for s in input_shape],
          "metadata": dict(metadata or {})}
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), params, force=force)
  with open(os.path.join(path, "extractor.json"), "w") as f:
    json.dump(spec, f, indent=2, sort_keys=True)
  return path


def load_extractor(path: str | os.PathLike) -> tuple[FeatureNet, dict, dict]:
  """Restores `(model, params, metadata)` written by `save_extractor`."""
  path = os.path.abspath(os.fspath(path))
  spec_file = os.path.join(path, "extractor.json")
  if not os.path.exists(spec_file):
    raise FileNotFoundError(f"no feature extractor at {path} (missing "
                            f"extractor.json)")
  with open(spec_file) as f:
    spec = json.load(f)
  fields = tuple(
      ConditionField(**{**d, "class_names": tuple(d["class_names"]),
                        "value_range": tuple(d["value_range"])})
      for d in spec["fields"])
  # A spec without stem_patch / pooling describes a stem_patch-1, mean-pooled net.
  model = make_extractor(fields, widths=spec["widths"],
                         feature_dim=spec["feature_dim"],
                         stem_patch=spec.get("stem_patch", 1),
                         pooling=spec.get("pooling", "mean"))
  dummy = jnp.zeros((1, *spec["input_shape"]), jnp.float32)
  # Every leaf on this host's first device: without a target sharding orbax
  # uses the saved one, so an extractor trained on a GPU host would not
  # restore on a CPU-only one.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      jax.eval_shape(lambda: model.init(jax.random.key(0, impl="rbg"), dummy))["params"])
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(path, "params"), abstract)
  return model, params, spec["metadata"]
