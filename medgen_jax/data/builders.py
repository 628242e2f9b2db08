"""Shared machinery of the TFDS builders: config checks, naming, build().

Each builder module (`builders_phantom`, `builders_folder`,
`builders_medmnist`) exposes `plan(data_config) -> Plan`: everything needed to
write the dataset, validated up front (bad input fails here, before TFDS
creates any directory). `build(data_config)` turns a plan into array_record
files under `data_dir/<name>/<config_name>/<version>` through TFDS's
incomplete-directory mechanism (written to a temp dir, renamed on success), so a
failed build never leaves a dataset that looks complete. Builds of one
configuration hold a lock file beside it: a second process waits and then
reuses the finished dataset, and the `incomplete.*` directory a killed build
left behind is removed before the next build starts from scratch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import glob
import hashlib
import importlib
import json
import logging
import os
import shutil
from typing import Any, Callable, Mapping

import numpy as np
import tensorflow_datasets as tfds

from medgen_jax.data.info import DatasetInfo

SPLITS = ("train", "validation", "test")
VERSION = "1.0.0"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "medgen_jax", "tensorflow_datasets")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 256

log = logging.getLogger("medgen_jax.data")


@dataclasses.dataclass
class Plan:
  """A validated description of one dataset build.

  Attributes:
    name: builder name ('ct_phantom', ...).
    config_name: directory name of this configuration (a content hash: no
      source path or subject name can appear in it).
    features: TFDS FeaturesDict.
    splits: split name -> zero-argument callable yielding (key, example).
    info: medgen DatasetInfo of ALL stored channels (num_examples filled later).
    summary: JSON-able facts for summary.json (no identifiers).
  """
  name: str
  config_name: str
  features: Any
  splits: Mapping[str, Callable[[], Any]]
  info: DatasetInfo
  summary: dict[str, Any]


def as_tuple(value) -> tuple:
  """Accepts 'a,b', ('a', 'b'), ('a,b',) or a scalar.

  config_flags turns `--config.modalities=t1,t2` on a tuple field into
  ('t1,t2',), so comma strings inside sequences are split as well.
  """
  if value is None:
    return ()
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  if isinstance(value, (list, tuple)):
    return tuple(x for v in value
                 for x in (as_tuple(v) if isinstance(v, str) else (v,)))
  return (value,)


def config_hash(fields: Mapping[str, Any]) -> str:
  text = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def data_dir(data_config) -> str:
  return os.path.expanduser(data_config.get("data_dir") or DEFAULT_DATA_DIR)


def validate_common(data_config) -> None:
  """Checks shared by every builder; raises ValueError naming the field."""
  builder_module(data_config.get("name"))
  mode = data_config.get("mode", "2d")
  if mode not in ("2d", "3d"):
    raise ValueError(f"data.mode must be '2d' or '3d', got {mode!r}")
  size = data_config.get("image_size", 64)
  if not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
    raise ValueError(f"data.image_size must be an int in [{MIN_IMAGE_SIZE}, "
                     f"{MAX_IMAGE_SIZE}], got {size!r}")
  if mode == "3d":
    depth = data_config.get("depth", 32)
    if not isinstance(depth, int) or not 4 <= depth <= MAX_IMAGE_SIZE:
      raise ValueError(f"data.depth must be an int in [4, {MAX_IMAGE_SIZE}] in 3d "
                       f"mode, got {depth!r}")
  lo, hi = as_tuple(data_config.get("ct_window", (-1000.0, 1000.0)))
  if not float(lo) < float(hi):
    raise ValueError(f"data.ct_window must be (lo, hi) with lo < hi, got {(lo, hi)}")
  if not float(data_config.get("pet_max_suv", 10.0)) > 0:
    raise ValueError("data.pet_max_suv must be > 0")


BUILDER_MODULES = {"ct_phantom": "medgen_jax.data.builders_phantom",
                   "medical_folder": "medgen_jax.data.builders_folder",
                   "medmnist": "medgen_jax.data.builders_medmnist"}


def spatial_shape(data_config) -> tuple[int, ...]:
  """The configured spatial shape of one example: `(H, W)` or `(D, H, W)`.

  Read from the config alone (no data touched), so configuration checks that
  depend on it (token grids, sequence sharding) run before any data work.
  medmnist has no `depth` field: its 3D sets are cubes of `image_size`.
  """
  s = int(data_config.image_size)
  if data_config.mode != "3d":
    return (s, s)
  return (int(data_config.get("depth", s)), s, s)


def builder_module(name: str):
  """Registry lookup: builder name -> module with validate/config_name/plan."""
  if name not in BUILDER_MODULES:
    raise ValueError(f"data.name {name!r} unknown; expected one of "
                     f"{sorted(BUILDER_MODULES)}")
  return importlib.import_module(BUILDER_MODULES[name])


def validate(data_config) -> None:
  validate_common(data_config)
  builder_module(data_config.name).validate(data_config)


def condition_names(data_config) -> tuple[str, ...] | None:
  """The condition fields `data_config`'s dataset has, without building it.

  From the builder's declaration (ct_phantom) or the labels CSV header
  (medical_folder); None where only the built dataset can tell (medmnist
  reads its label layout from the release files). Validates the config.
  """
  validate(data_config)
  names = getattr(builder_module(data_config.name), "condition_names", None)
  return None if names is None else tuple(names(data_config))


def builder_dir(data_config, config_name: str) -> str:
  return os.path.join(data_dir(data_config), data_config.name, config_name, VERSION)


def make_builder_class(builder_name: str):
  """A GeneratorBasedBuilder whose features and splits come from a Plan.

  Not added to TFDS's global registry (reading goes through
  `tfds.builder_from_directory`), so it cannot clash with other datasets.
  """

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = builder_name
    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = []
    # pylint: disable=protected-access

    def __init__(self, *, plan: Plan, **kwargs):
      self._plan = plan  # before super(): TFDS reads self.info while constructing.
      super().__init__(config=tfds.core.BuilderConfig(name=plan.config_name),
                       **kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=f"medgen_jax {builder_name}",
          features=self._plan.features,
          metadata=tfds.core.MetadataDict(
              medgen_info=self._plan.info.to_json(), summary=self._plan.summary))

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is ever downloaded.
      return {split: self._generate_examples(make)
              for split, make in self._plan.splits.items()}

    def _generate_examples(self, make):
      yield from make()

  _Builder.__name__ = "".join(p.title() for p in builder_name.split("_"))
  _Builder.MANUAL_DOWNLOAD_INSTRUCTIONS = getattr(
      builder_module(builder_name), "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  return _Builder


@functools.lru_cache(maxsize=None)
def _builder_class(name: str):
  return make_builder_class(name)


def build(data_config, *, overwrite: bool = False) -> dict[str, Any]:
  """Builds (if needed) the dataset `data_config` describes.

  Returns:
    The summary dict (splits with subjects/examples, shapes, intensity policy,
    skipped files and why, builder_dir), also stored in the dataset metadata.
  """
  validate(data_config)
  module = builder_module(data_config.name)
  config_name = module.config_name(data_config)
  path = builder_dir(data_config, config_name)
  done = lambda: os.path.exists(os.path.join(path, "dataset_info.json"))
  if overwrite or not done():
    with _build_lock(os.path.dirname(path)):
      if overwrite or not done():  # (another process may have built it meanwhile)
        _remove_stale_partials(os.path.dirname(path))
        plan = module.plan(data_config)
        builder = _builder_class(data_config.name)(
            plan=plan, data_dir=data_dir(data_config), file_format="array_record")
        mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
                else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(download_mode=mode))
        log.info("built %s/%s", data_config.name, config_name)
  return read_summary(path)


@contextlib.contextmanager
def _build_lock(config_dir: str):
  """An exclusive lock on `<config_dir>/.build.lock` (released by the kernel if we die)."""
  os.makedirs(config_dir, exist_ok=True)
  with open(os.path.join(config_dir, ".build.lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_partials(config_dir: str) -> None:
  """Removes what a killed build left (TFDS's `incomplete.*` directories).

  Called under `_build_lock`, so no live build of this configuration is
  writing them.
  """
  for partial in glob.glob(os.path.join(config_dir, "incomplete.*")):
    log.warning("removing %s, left by a build that did not finish", partial)
    shutil.rmtree(partial, ignore_errors=True)


def read_builder(path: str):
  return tfds.builder_from_directory(path)


def _metadata(path: str) -> dict[str, Any]:
  with open(os.path.join(path, "metadata.json")) as f:
    return json.load(f)


def read_summary(path: str) -> dict[str, Any]:
  builder = read_builder(path)
  summary = dict(_metadata(path)["summary"])
  summary["builder_dir"] = path
  summary["num_examples"] = {s: int(v.num_examples)
                             for s, v in builder.info.splits.items()}
  return summary


def read_info(path: str) -> DatasetInfo:
  builder = read_builder(path)
  info = DatasetInfo.from_json(_metadata(path)["medgen_info"])
  counts = {s: int(v.num_examples) for s, v in builder.info.splits.items()}
  return dataclasses.replace(info, num_examples=counts)


def int64_id(opaque: str) -> int:
  """An opaque hex id as a non-negative int64 (stored per example)."""
  return int(opaque[:15], 16)


def split_of(opaque: str, fractions) -> str:
  """Deterministic subject-level split from the opaque id's hash."""
  fractions = np.asarray(fractions, np.float64)
  u = int(hashlib.sha256(f"split:{opaque}".encode()).hexdigest()[:13], 16) / 16**13
  edges = np.cumsum(fractions / fractions.sum())
  return SPLITS[int(np.searchsorted(edges, u, side="right"))]
