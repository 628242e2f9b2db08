"""Where does the noise go, and does D memorise? Two collapse diagnostics.

`noise_spread` draws K noise vectors for one fixed set of conditions and
measures, at every module of the generator, how much the activations differ
between the K draws (the relative spread below). A spread that is high at the
stem and near zero at the image says the network learned to ignore the noise
on the way; a spread near zero everywhere says the noise never got in.

`discriminator_gap` scores real training images, real held-out images and
generated images with the trained D. Training logits well above held-out
ones mean D memorises its training set (Karras et al. 2020's overfitting
heuristic), which starves G of a useful gradient.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from medgen_jax import data as data_lib
from medgen_jax import models as models_lib
from medgen_jax import viz
from medgen_jax.train import checkpoint as ckpt_lib
from medgen_jax.train import state as state_lib


def relative_spread(values: np.ndarray) -> float:
  """mean_k ||v_k - mean_k v|| / mean_k ||v_k|| over the leading axis.

  0 when all K rows are equal; scale-free, so stages of different width
  compare. `values`: `[K, ...]`.
  """
  flat = np.asarray(values, np.float64).reshape(len(values), -1)
  centre = flat.mean(0, keepdims=True)
  norm = np.linalg.norm(flat, axis=1).mean()
  return float(np.linalg.norm(flat - centre, axis=1).mean() / norm) if norm > 0 else 0.0


def _module_outputs(intermediates: Mapping[str, Any], prefix: str = ""
                    ) -> dict[str, np.ndarray]:
  """Flattens flax's captured intermediates to 'path' -> first output array."""
  out = {}
  for name, value in intermediates.items():
    path = f"{prefix}/{name}" if prefix else name
    if name == "__call__":
      first = value[0]
      if isinstance(first, tuple):  # e.g. the stem's (tokens, style)
        for i, part in enumerate(first):
          out[f"{prefix}[{i}]"] = np.asarray(part)
      else:
        out[prefix] = np.asarray(first)
    elif isinstance(value, Mapping):
      out.update(_module_outputs(value, path))
  return out


def noise_spread(generator: Any, variables: Mapping[str, Any],
                 conditions: Mapping[str, np.ndarray], z: np.ndarray,
                 *, top_level_only: bool = True) -> dict[str, float]:
  """Relative spread over K noise draws at each generator module.

  Args:
    generator: a linen generator `G(z, conditions, *, train)`.
    variables: its variables ({'params': ...} plus any state).
    conditions: name -> `[K]`, every row the same condition.
    z: `[K, latent_dim]` noise.
    top_level_only: report only direct children of the generator (stem
      tokens/style, blocks, conv stages, head) and the image.

  Returns:
    module path -> relative spread (the image under 'image').
  """
  image, state = generator.apply(dict(variables), jnp.asarray(z), conditions, train=False,
                                 capture_intermediates=True, mutable=["intermediates"])
  outputs = _module_outputs(state["intermediates"])
  outputs.pop("", None)  # the generator itself: the image, reported below
  if top_level_only:
    outputs = {k: v for k, v in outputs.items() if "/" not in k}
  spread = {k: relative_spread(v) for k, v in outputs.items()}
  spread["image"] = relative_spread(np.asarray(image))
  return spread


def discriminator_gap(discriminator: Any, variables: Mapping[str, Any],
                      batches: Mapping[str, tuple[np.ndarray, Mapping[str, np.ndarray]]]
                      ) -> dict[str, float]:
  """Mean D logit of each named image set, and the train - held-out gap.

  Args:
    discriminator: linen D `(images, conditions, *, train) -> [B]`.
    variables: its variables.
    batches: name -> (images `[N, *spatial, C]` in [-1, 1], conditions);
      'train' and 'test' give the gap.

  Returns:
    'logit_<name>' per set, and 'train_minus_test' when both are given.
  """
  score = jax.jit(lambda x, c: discriminator.apply(dict(variables), x, c, train=False))
  out = {f"logit_{name}": float(np.mean(score(jnp.asarray(x), c)))
         for name, (x, c) in batches.items()}
  if "train" in batches and "test" in batches:
    out["train_minus_test"] = out["logit_train"] - out["logit_test"]
  return out


def _real_examples(data_config: Any, split: str, n: int, seed: int
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The first `n` examples of a split (stored order shuffled with `seed`)."""
  iterator, info = data_lib.load_dataset(data_config, split=split, batch_size=n, seed=seed,
                                         num_epochs=1)
  batch = next(iterator)
  return np.asarray(batch["image"]), {f.name: np.asarray(batch[f.name]) for f in info.conditions}


def diagnose_run(config: Any, workdir: str, *, num_noise: int = 16, num_real: int = 256,
                 seed: int = 0) -> dict[str, Any]:
  """Both diagnostics for the newest checkpoint of a generation run.

  For every class of the sample grid's condition (others unknown), the
  EMA generator's relative spread over `num_noise` draws at each top-level
  module, beside the same spread of `num_noise` real training images of that
  class; the same spread with every condition given (the first test slice's);
  and D's mean logit on `num_real` training, held-out test and generated
  images (generated from the test images' conditions).

  Returns:
    {'checkpoint_step', 'noise_spread': {class: {module: spread}},
     'real_spread': {class: spread}, 'noise_spread_all_conditions':
     {'conditions', module: spread}, 'discriminator': discriminator_gap(...)}.
  """
  if config.task != "generation":
    raise ValueError(f"diagnostics read a GAN run's generator and discriminator; "
                     f"config.task is {config.task!r}")
  info = data_lib.load_info(config.data)
  generator = models_lib.build_generator(config.model, info)
  discriminator = models_lib.build_discriminator(config.model, info)
  latent = int(config.model.latent_dim)
  key = jax.random.PRNGKey(0)
  cond1 = state_lib.dummy_conditions(info, 1)
  g_vars = jax.eval_shape(lambda: generator.init(key, jnp.zeros((1, latent)), cond1,
                                                  train=False))
  d_vars = jax.eval_shape(lambda: discriminator.init(
      key, jnp.zeros((1, *info.image_shape)), cond1, train=False))
  g_state = {k: v for k, v in g_vars.items() if k != "params"}
  d_state = {k: v for k, v in d_vars.items() if k != "params"}
  wanted = {"ema_params": g_vars["params"], "d_params": d_vars["params"]}
  if g_state:
    wanted["g_state"] = g_state
  if d_state:
    wanted["d_state"] = d_state
  fields, step = ckpt_lib.restore_fields(workdir, wanted,
                                         keep=int(config.train.keep_checkpoints))
  g_variables = {"params": fields["ema_params"], **fields.get("g_state", {})}
  d_variables = {"params": fields["d_params"], **fields.get("d_state", {})}

  train_x, train_c = _real_examples(config.data, "train", num_real, seed)
  test_x, test_c = _real_examples(config.data, "test", num_real, seed)
  field = viz.row_condition(info)
  grid_cond, labels = viz.grid_conditions(info, num_noise)
  z = jax.random.normal(jax.random.PRNGKey(seed + 1), (len(labels) * num_noise, latent))
  spread, real_spread = {}, {}
  for row, label in enumerate(labels):
    rows = slice(row * num_noise, (row + 1) * num_noise)
    cond = {k: jnp.asarray(v[rows]) for k, v in grid_cond.items()}
    spread[label] = noise_spread(generator, g_variables, cond, np.asarray(z[rows]))
    same = train_x if field is None else train_x[train_c[field] == row]
    real_spread[label] = relative_spread(same[:num_noise]) if len(same) > 1 else float("nan")

  # Every condition given (the first test slice's), as the evaluation asks:
  # with age and site fixed too, only the noise can make samples differ.
  full = {k: jnp.repeat(jnp.asarray(v[:1]), num_noise, axis=0) for k, v in test_c.items()}
  spread_full = noise_spread(generator, g_variables, full, np.asarray(z[:num_noise]))

  z_fake = jax.random.normal(jax.random.PRNGKey(seed + 2), (len(test_x), latent))
  fake = generator.apply(g_variables, z_fake, test_c, train=False)
  gap = discriminator_gap(discriminator, d_variables, {
      "train": (train_x, train_c), "test": (test_x, test_c),
      "generated": (np.asarray(fake), test_c)})
  return dict(checkpoint_step=step, noise_spread=spread, real_spread=real_spread,
              noise_spread_all_conditions=dict(
                  conditions={k: float(v[0]) for k, v in test_c.items()}, **spread_full),
              discriminator=gap)
