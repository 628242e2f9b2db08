"""What several config files share: the variant parser, the eval section and
the condition classifier's recipe sections."""
from __future__ import annotations

from typing import Iterable

import ml_collections

from medgen_jax import classifier
from medgen_jax.eval import settings as eval_settings

# Types of the eval settings whose default is None, so that the config holds
# a typed placeholder the command line can set (--config.eval.max_test=100).
_NONE_TYPES = dict(num_samples=int, extractor_path=str, max_train=int, max_test=int)


def parse_variants(arg: str | None, *, config: str, flags: Iterable[str] = (),
                   values: Iterable[str] = ()) -> tuple[list[str], dict[str, str]]:
  """`'quick,attention=axial'` -> (['quick'], {'attention': 'axial'}).

  Args:
    arg: the text after the config file's ':' (None or '' for no variants).
    config: the config's name, for the error message.
    flags: the allowed bare variants.
    values: the allowed `name=value` variants.

  Returns:
    (the bare variants in the order given, {name: value}); the last of a
    repeated `name=value` wins.

  Raises:
    ValueError: an unknown variant, naming the allowed ones.
  """
  flags, values = tuple(flags), tuple(values)
  bare, named = [], {}
  for item in (v.strip() for v in (arg or "").split(",")):
    if not item:
      continue
    name, sep, value = item.partition("=")
    if sep and name in values:
      named[name] = value
    elif not sep and item in flags:
      bare.append(item)
    else:
      allowed = list(flags) + [f"{v}=..." for v in values]
      raise ValueError(f"{config}: unknown variant {item!r}; use {', '.join(allowed)}")
  return bare, named


def eval_section(**overrides) -> ml_collections.ConfigDict:
  """`config.eval` with every evaluation setting (`medgen_jax.eval.settings.DEFAULTS`).

  Every key is present, so each one can be read in the config file and
  overridden on the command line; settings whose default is None are typed
  placeholders.

  Args:
    **overrides: this config's values for some keys (unknown keys are errors).
  """
  unknown = sorted(set(overrides) - set(eval_settings.DEFAULTS))
  if unknown:
    raise ValueError(f"eval_section: unknown eval settings {unknown}")
  section = {}
  for key, default in {**eval_settings.DEFAULTS, **overrides}.items():
    if default is None:
      default = ml_collections.config_dict.placeholder(_NONE_TYPES[key])
    section[key] = default
  return ml_collections.ConfigDict(section)


def classifier_section(**overrides) -> ml_collections.ConfigDict:
  """A condition classifier's recipe section (`config.teacher`, `config.selector`).

  Every field of `medgen_jax.classifier.Recipe` with its default there, so
  each one can be overridden on the command line (`--config.teacher.steps=600`);
  `fields` is comma separated ('' = every condition), `max_train` a typed
  placeholder (None = the whole train split).

  Args:
    **overrides: this use's values for some recipe fields, and keys of the
      use itself (e.g. the selector's `candidates`).
  """
  recipe = {k: v for k, v in overrides.items() if k in classifier.recipe.FIELDS}
  section = classifier.section_values(**recipe)
  section.update({k: v for k, v in overrides.items() if k not in recipe})
  if section["max_train"] is None:
    section["max_train"] = ml_collections.config_dict.placeholder(int)
  return ml_collections.ConfigDict(section)


def judge_section(**overrides) -> ml_collections.ConfigDict:
  """The evaluation judge's section (`config.judge`, `classifier.judge`).

  A recipe apart from the teacher's and the selector's (four stages, a
  2x2 space-to-depth stem, mean and max pooling, many more steps, its own
  seed), trained on `subjects` fresh phantom subjects outside every split
  (0, or a dataset other than ct_phantom: the real train split).
  """
  values = dict(steps=6000, batch_size=32, lr=1e-3, widths=(16, 32, 64, 128),
                feature_dim=128, stem_patch=2, pooling="mean_max", seed=11, subjects=2000)
  values.update(overrides)
  return classifier_section(**values)



def flow_loss_section(**overrides) -> ml_collections.ConfigDict:
  """`config.loss` of a flow-matching run (`medgen_jax.train.flow.LOSS_KEYS`).

  time_mean, time_std: the logit-normal training-time distribution,
  t = sigmoid(time_mean + time_std * N(0, 1)); cfg_dropout: probability that
  an example's conditions are all dropped (classifier-free guidance);
  ema_decay: the sampled generator's EMA.
  """
  values = dict(time_mean=0.0, time_std=1.0, cfg_dropout=0.1, ema_decay=0.995)
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ValueError(f"flow_loss_section: unknown flow loss settings {unknown}")
  values.update(overrides)
  return ml_collections.ConfigDict(values)
