"""`Recipe`: how one condition classifier is trained, and so which cached one it is.

Each use of the classifier has its own recipe, read from its own config
section by `from_section`:

- the evaluation's domain extractor: `config.eval.extractor_*` (and
  `config.eval.max_train`), read by `medgen_jax.eval.settings`;
- the GAN's frozen condition teacher: `config.teacher`;
- the best-of-K sample selector: `config.selector` (beside its `candidates`);
- the downstream classifier of the augmentation studies: `config.classifier`.

The defaults below are the evaluation extractor's; a config section states
every key, so a use differs from another only where its section says so.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from medgen_jax.classifier.network import POOLINGS


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A condition classifier's training settings.

  Attributes:
    steps: AdamW steps (cosine decay).
    batch_size: real train images per step.
    lr: peak learning rate.
    widths: channels per stage (`FeatureNet.widths`).
    feature_dim: penultimate width (`FeatureNet.feature_dim`).
    stem_patch: space-to-depth factor of the stem (`FeatureNet.stem_patch`).
    pooling: 'mean' or 'mean_max' (`FeatureNet.pooling`).
    seed: initialisation and batch-order seed.
    max_train: cap on real train images (None: the whole split).
    fields: condition names it is trained on and reads (empty: every
      condition of the dataset).
  """
  steps: int = 1500
  batch_size: int = 64
  lr: float = 1e-3
  widths: tuple[int, ...] = (16, 32, 64)
  feature_dim: int = 64
  stem_patch: int = 2
  pooling: str = "mean_max"
  seed: int = 0
  max_train: int | None = None
  fields: tuple[str, ...] = ()

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("widths", tuple(int(w) for w in self.widths))
    set_("fields", parse_fields(self.fields))
    for key in ("steps", "batch_size", "feature_dim", "stem_patch", "seed"):
      set_(key, int(getattr(self, key)))
    set_("lr", float(self.lr))
    if self.max_train is not None:
      set_("max_train", int(self.max_train))
    if self.steps < 1 or self.batch_size < 1:
      raise ValueError(f"classifier steps and batch_size must be >= 1, got "
                       f"{self.steps}, {self.batch_size}")
    if not self.widths or min(self.widths) < 1 or self.feature_dim < 1:
      raise ValueError(f"classifier widths and feature_dim must be positive, got "
                       f"{self.widths}, {self.feature_dim}")
    if self.stem_patch < 1:
      raise ValueError(f"classifier stem_patch must be >= 1, got {self.stem_patch}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"classifier pooling must be one of {POOLINGS}, got "
                       f"{self.pooling!r}")

  @property
  def architecture(self) -> dict[str, Any]:
    """The `training.make_extractor` keywords."""
    return dict(widths=self.widths, feature_dim=self.feature_dim,
                stem_patch=self.stem_patch, pooling=self.pooling)

  @property
  def optimisation(self) -> dict[str, Any]:
    """The `training.train_feature_extractor` keywords besides the architecture."""
    return dict(steps=self.steps, batch_size=self.batch_size, seed=self.seed, lr=self.lr)

  def cache_key(self) -> dict[str, Any]:
    """The training block of the cache key (`medgen_jax.classifier.cache`).

    Its names are the on-disk format of existing caches; `fields` enters the
    key through the dataset identity's condition list instead.
    """
    return {"extractor_steps": self.steps, "extractor_batch_size": self.batch_size,
            "extractor_lr": self.lr, "extractor_widths": list(self.widths),
            "extractor_feature_dim": self.feature_dim,
            "extractor_stem_patch": self.stem_patch, "extractor_pooling": self.pooling,
            "extractor_seed": self.seed, "max_train": self.max_train}


FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))


def parse_fields(fields: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
  """'lesion, site' or ('lesion', 'site') -> ('lesion', 'site'); '' / None -> ()."""
  if fields is None:
    return ()
  items = fields.split(",") if isinstance(fields, str) else fields
  return tuple(n.strip() for n in items if str(n).strip())


def from_section(section: Mapping[str, Any], *, prefix: str = "",
                 unprefixed: tuple[str, ...] = (), name: str = "") -> Recipe:
  """The `Recipe` of the keys `prefix + name` of a config section.

  Args:
    section: a config section (ConfigDict or dict); keys that are no recipe
      field are left alone (e.g. `selector.candidates`, the eval metrics).
    prefix: how the section spells the recipe's keys (`'extractor_'` in
      `config.eval`).
    unprefixed: recipe fields the section names without the prefix
      (`config.eval.max_train`).
    name: the section's config name (`'teacher'`), which starts the message
      of a bad value.

  Raises:
    ValueError: a bad recipe value (`Recipe`), prefixed by `name`.
  """
  given = {}
  for field in FIELDS:
    key = field if field in unprefixed else prefix + field
    if key in section:
      given[field] = section[key]
  try:
    return Recipe(**given)
  except (TypeError, ValueError) as e:
    if not name:
      raise
    raise ValueError(f"{name}: {e}") from e


def section_values(recipe: Recipe = Recipe(), **overrides) -> dict[str, Any]:
  """Every field of `recipe` (default: the defaults) as config values.

  `fields` becomes a comma-separated string (settable on the command line);
  `overrides` replace fields by name.
  """
  values = {**dataclasses.asdict(recipe), **overrides}
  unknown = sorted(set(values) - set(FIELDS))
  if unknown:
    raise ValueError(f"unknown classifier recipe fields {unknown}; known: {list(FIELDS)}")
  values["fields"] = ",".join(parse_fields(values["fields"]))
  return values
