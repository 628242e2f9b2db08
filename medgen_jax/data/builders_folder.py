"""`medical_folder`: a researcher's own NIfTI / DICOM / PNG / NPY folder.

Layouts (one entry of `source_dir` per subject):
  flat:          source/<subject>.nii.gz | .nii | .npy | .png
                 source/<subject>/*.dcm            (one DICOM series)
  per-modality:  source/<subject>/<modality>.nii.gz (etc.)
                 source/<subject>/<modality>/*.dcm
Several modalities of a subject become aligned channels of one example.

`plan()` reads every subject once before TFDS writes anything, so bad input
fails before a dataset directory exists (policy in docs/data.md):
  * empty folder, NaN/inf voxels, paired modalities of different shapes, a 2D
    image in 3D mode, CSV rows naming unknown subjects, values outside the
    configured classes: ValueError naming the file and the problem.
  * unreadable (corrupt, truncated) files and subjects lacking a requested
    modality: the subject is skipped, with a warning and a count in the
    summary that name only the subject's opaque id.
Subject names (often patient ids) never leave this module: examples carry a
salted-hash id, summaries and logs use its hex form.

Geometry: `info.spacing_mm` and `info.extra['affine']` describe the built
voxels in the scanner's RAS millimetres (`_output_geometry`), so samples can
be written back in the training scans' frame (`medgen_jax.inference.nifti`).
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from scipy import ndimage

from medgen_jax.data import builders, readers
from medgen_jax.data.info import CATEGORICAL, CONTINUOUS, ConditionField, DatasetInfo
from medgen_jax.data.intensity import (POLICIES, default_policy, percentile_normalise,
                                       transform_for)

log = logging.getLogger("medgen_jax.data")
DEFAULT_SALT = "medgen_jax-default-salt"
RESERVED = ("image", "subject", "lesion_mask", "lesion_diameter_mm")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _policies(data_config) -> dict[str, str]:
  mods = builders.as_tuple(data_config.modalities)
  given = builders.as_tuple(data_config.get("intensity_policy", ""))
  if not given:
    return {m: default_policy(m) for m in mods}
  if len(given) == 1:
    given = given * len(mods)
  if len(given) != len(mods):
    raise ValueError(f"medical_folder: intensity_policy {given} needs one entry or "
                     f"one per modality {mods}")
  return dict(zip(mods, given))


def validate(data_config) -> None:
  src = data_config.get("source_dir")
  if not src or not os.path.isdir(os.path.expanduser(src)):
    raise ValueError(f"medical_folder: source_dir {src!r} is not a directory; point "
                     f"data.source_dir at your folder (--config.data.source_dir=DIR, "
                     f"or --config.source_dir=DIR with configs/data_folder.py)")
  mods = builders.as_tuple(data_config.modalities)
  if not mods or any(not _NAME.match(m) or m in RESERVED for m in mods):
    raise ValueError(f"medical_folder: modalities must be lowercase names like "
                     f"'ct' or 't1' (not {RESERVED}), got {mods}")
  for m, p in _policies(data_config).items():
    if p not in POLICIES:
      raise ValueError(f"medical_folder: unknown intensity_policy {p!r} for {m!r}; "
                       f"expected one of {POLICIES}")
  csv_path = data_config.get("labels_csv")
  if csv_path and not os.path.isfile(os.path.expanduser(csv_path)):
    raise ValueError(f"medical_folder: labels_csv {csv_path!r} does not exist")
  condition_names(data_config)  # the CSV header's columns, checked before any image
  fr = builders.as_tuple(data_config.split_fractions)
  if len(fr) != 3 or min(float(f) for f in fr) < 0 or sum(float(f) for f in fr) <= 0:
    raise ValueError(f"medical_folder: split_fractions must be 3 non-negative "
                     f"numbers (train, validation, test), got {fr}")
  if int(data_config.slice_step) < 1:
    raise ValueError("medical_folder: slice_step must be >= 1")


def _fingerprint(data_config) -> list:
  """Relative paths, sizes and mtimes: a changed source means a new dataset."""
  root = os.path.expanduser(data_config.source_dir)
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for f in sorted(filenames):
      path = os.path.join(dirpath, f)
      try:
        st = os.stat(path)
      except OSError:  # a dangling link: skipped when read, not a crash here
        st = os.lstat(path)
      out.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
  csv_path = data_config.get("labels_csv")
  if csv_path:
    st = os.stat(os.path.expanduser(csv_path))
    out.append(("<labels>", st.st_size, st.st_mtime_ns))
  return out


_BUILD_FIELDS = ("source_dir", "labels_csv", "subject_column", "categorical_columns",
                 "class_names", "image_size", "mode", "depth", "modalities",
                 "intensity_policy", "percentiles", "raw_range", "slice_step",
                 "foreground_only", "foreground_fraction", "split_fractions", "id_salt")


def config_name(data_config) -> str:
  fields = {k: (data_config.get(k).to_dict() if hasattr(data_config.get(k), "to_dict")
                else data_config.get(k)) for k in _BUILD_FIELDS}
  fields["source_dir"] = os.path.abspath(os.path.expanduser(data_config.source_dir))
  fields["files"] = _fingerprint(data_config)
  dims = "x".join(str(d) for d in builders.spatial_shape(data_config))
  return f"{data_config.mode}_{dims}_{builders.config_hash(fields)}"


@dataclasses.dataclass
class _Subject:
  opaque: str
  sources: dict[str, list[str]]  # modality -> file(s) (a DICOM series: many).


def _is_hidden(name: str) -> bool:
  return name.startswith(".") or name.startswith("__")


def _series_files(folder: str) -> list[str]:
  """DICOM files of a series folder: *.dcm or files without a suffix."""
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if not _is_hidden(f) and os.path.isfile(os.path.join(folder, f))
                and (f.lower().endswith(".dcm") or "." not in f))


def _strip_suffix(name: str) -> str:
  suffix = readers.image_suffix(name)
  return name[:-len(suffix)] if suffix else name


def _discover(root: str, modalities: tuple[str, ...], salt: str):
  """subject name -> _Subject, plus skipped records and ignored-file count."""
  subjects, skipped, ignored = {}, [], 0
  for entry in sorted(os.listdir(root)):
    path = os.path.join(root, entry)
    if _is_hidden(entry):
      ignored += 1
      continue
    if not os.path.isdir(path) and not os.path.isfile(path):
      # A dangling link or special file named like an image: an unreadable
      # subject (skipped and counted); anything else is ignored.
      if readers.image_suffix(entry):
        name = _strip_suffix(entry)
        opaque = readers.opaque_id(name, salt)
        skipped.append({"subject": opaque, "reason": "not a readable file"})
        log.warning("skipping subject %s: not a readable file", opaque)
      else:
        ignored += 1
      continue
    if os.path.isfile(path):
      if readers.image_suffix(entry) in (".nii", ".nii.gz", ".npy", ".png"):
        if len(modalities) != 1:
          raise ValueError(f"{path}: a flat-layout file holds one channel but "
                           f"modalities={modalities}; use per-subject folders "
                           f"<subject>/<modality>.nii.gz")
        name = _strip_suffix(entry)
        subjects[name] = _Subject(readers.opaque_id(name, salt),
                                  {modalities[0]: [path]})
      else:
        ignored += 1  # labels CSV, notes, ...
      continue
    opaque = readers.opaque_id(entry, salt)
    try:
      children = {c.lower(): c for c in os.listdir(path) if not _is_hidden(c)}
    except OSError:  # no permission, stale network mount
      skipped.append({"subject": opaque, "reason": "folder not readable"})
      log.warning("skipping subject %s: folder not readable", opaque)
      continue
    sources = {}
    for m in modalities:
      if m in children and os.path.isdir(os.path.join(path, children[m])):
        files = _series_files(os.path.join(path, children[m]))
        if files:
          sources[m] = files
        continue
      for c_lower, c in children.items():
        if (readers.image_suffix(c_lower) and _strip_suffix(c_lower) == m
            and os.path.isfile(os.path.join(path, c))):
          sources[m] = [os.path.join(path, c)]
    if not sources and len(modalities) == 1:  # flat: the folder is one series.
      files = _series_files(path)
      if files:
        sources[modalities[0]] = files
      else:
        images = [os.path.join(path, c) for c in sorted(children.values())
                  if readers.image_suffix(c) and os.path.isfile(os.path.join(path, c))]
        if len(images) == 1:
          sources[modalities[0]] = images
    missing = [m for m in modalities if m not in sources]
    if missing:
      skipped.append({"subject": opaque, "reason": f"no image for modality {missing}"})
      log.warning("skipping subject %s: no image for modality %s", opaque, missing)
      continue
    subjects[entry] = _Subject(opaque, sources)
  return subjects, skipped, ignored


def _condition_name(column: str, csv_path: str, data_config) -> str:
  """A CSV column's condition name (lowercased), or a ValueError naming it."""
  name = column.strip().lower()
  if not _NAME.match(name) or name in RESERVED or name in builders.as_tuple(
      data_config.modalities):
    raise ValueError(f"{csv_path}: column {column!r} cannot be a condition name "
                     f"(lowercase letters, digits, _; not {RESERVED} or a modality)")
  return name


def condition_names(data_config) -> tuple[str, ...]:
  """The condition fields the dataset will have, in CSV column order.

  Read from the labels CSV's header alone (no image, no other row), so the
  training and evaluation checks that depend on conditions run before any
  build. () without a labels CSV.
  """
  csv_path = data_config.get("labels_csv")
  if not csv_path:
    return ()
  csv_path = os.path.expanduser(csv_path)
  with open(csv_path, newline="") as f:
    header = next(csv.reader(f), [])
  key = data_config.subject_column
  if not header:
    raise ValueError(f"{csv_path}: labels CSV has no rows")
  if key not in header:
    raise ValueError(f"{csv_path}: no subject column {key!r}; columns are "
                     f"{header} (set data.subject_column)")
  return tuple(_condition_name(c, csv_path, data_config) for c in header if c != key)


def _read_labels(data_config, subject_names):
  """CSV -> (ConditionFields, {subject name: {field: value}}, unlabelled count)."""
  csv_path = data_config.get("labels_csv")
  if not csv_path:
    return (), {n: {} for n in subject_names}, 0
  csv_path = os.path.expanduser(csv_path)
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  key = data_config.subject_column
  if not rows:
    raise ValueError(f"{csv_path}: labels CSV has no rows")
  if key not in rows[0]:
    raise ValueError(f"{csv_path}: no subject column {key!r}; columns are "
                     f"{list(rows[0])} (set data.subject_column)")
  by_subject = {}
  for line, row in enumerate(rows, start=2):
    name = (row.get(key) or "").strip()
    if name in by_subject:
      raise ValueError(f"{csv_path}:{line}: subject listed twice")
    by_subject[name] = (line, row)
  unknown = sorted(set(by_subject) - set(subject_names))
  if unknown:
    raise ValueError(f"{csv_path}: {len(unknown)} row(s) name subjects not found "
                     f"in source_dir (first: {unknown[:3]}); fix the CSV or the folder")
  forced = builders.as_tuple(data_config.get("categorical_columns", ""))
  given_classes = dict(data_config.get("class_names") or {})
  fields, parsed = [], {n: {} for n in subject_names}
  for column in rows[0]:
    if column == key:
      continue
    name = _condition_name(column, csv_path, data_config)
    values = {n: (row.get(column) or "").strip() for n, (_, row) in by_subject.items()}
    known = [v for v in values.values() if v]

    def is_number(v):
      try:
        return math.isfinite(float(v))
      except ValueError:
        return False

    categorical = (name in forced or column in forced or name in given_classes
                   or not all(is_number(v) for v in known))
    if categorical:
      classes = builders.as_tuple(given_classes.get(name, ())) or tuple(sorted(set(known)))
      for n, v in values.items():
        if v and v not in classes:
          raise ValueError(f"{csv_path}:{by_subject[n][0]}: column {column!r} value "
                           f"{v!r} is not one of the classes {list(classes)}")
      fields.append(ConditionField(name, CATEGORICAL, max(len(classes), 1), classes))
      for n in subject_names:
        v = values.get(n, "")
        parsed[n][name] = classes.index(v) if v else -1
    else:
      nums = [float(v) for v in known]
      lo, hi = (min(nums), max(nums)) if nums else (0.0, 1.0)
      fields.append(ConditionField(name, CONTINUOUS, value_range=(lo, hi)))
      for n in subject_names:
        v = values.get(n, "")
        parsed[n][name] = float(v) if v else float("nan")
  unlabelled = len(set(subject_names) - set(by_subject))
  return tuple(fields), parsed, unlabelled


def _square(x: np.ndarray) -> np.ndarray:
  """Pads [..., H, W] to square with the minimum (background) value."""
  h, w = x.shape[-2:]
  s = max(h, w)
  pad = [(0, 0)] * (x.ndim - 2) + [((s - h) // 2, s - h - (s - h) // 2),
                                    ((s - w) // 2, s - w - (s - w) // 2)]
  return np.pad(x, pad, constant_values=float(x.min()))


def _resize(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  factors = [t / s for t, s in zip(shape, x.shape)]
  out = ndimage.zoom(x, factors, order=1, grid_mode=True, mode="nearest")
  return out.astype(np.float32)


def _load(subject: _Subject, data_config, policies, transforms):
  """Reads and checks a subject's channels -> list of {modality: array} examples."""
  vols = {m: readers.read_source(paths) for m, paths in subject.sources.items()}
  shapes = {m: v.array.shape for m, v in vols.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"{os.path.dirname(next(iter(subject.sources.values()))[0])}: "
                     f"paired modalities have different shapes {shapes}; they must "
                     f"be co-registered on one grid to become aligned channels")
  arrays = {}
  for m, v in vols.items():
    bad = int(np.size(v.array) - np.count_nonzero(np.isfinite(v.array)))
    if bad:
      raise ValueError(f"{subject.sources[m][0]}: {bad} NaN/inf voxels; fix or mask "
                       f"them before building")
    if data_config.mode == "3d" and v.is_2d:
      raise ValueError(f"{subject.sources[m][0]}: a 2D image cannot be resampled "
                       f"to a 3D volume (mode='3d'); use mode='2d'")
    arrays[m] = (percentile_normalise(v.array, builders.as_tuple(data_config.percentiles))
                 if policies[m] == "percentile" else v.array)
  first = next(iter(vols.values()))
  size = data_config.image_size
  if data_config.mode == "3d":
    target = (data_config.depth, size, size)
    return [{m: _resize(_square(a), target) for m, a in arrays.items()}], first
  lead = next(iter(arrays))
  indices = range(0, shapes[lead][0], int(data_config.slice_step))
  if data_config.foreground_only and not first.is_2d:
    model = transforms[lead].to_model(arrays[lead])  # [Z, H, W]
    frac = (model > -0.8).mean(axis=(1, 2))
    indices = [i for i in indices if frac[i] >= data_config.foreground_fraction]
  return [{m: _resize(_square(a[i]), (size, size)) for m, a in arrays.items()}
          for i in indices], first


def _output_geometry(volume: readers.Volume, data_config
                     ) -> tuple[tuple[float, ...], np.ndarray | None]:
  """(spacing in mm per axis, 4x4 affine) of the examples built from `volume`.

  3D: the affine maps voxel index `(d, h, w, 1)` of the built volume to the
  scanner's RAS millimetres. 2D: it maps `(h, w, k, 1)` of a slice to RAS
  with k along the slice normal, placed at the source's middle slice. The
  affine is None when the source has no geometry (PNG, NPY).
  """
  z_n, h_n, w_n = volume.array.shape
  side, size = max(h_n, w_n), int(data_config.image_size)

  def axis(n_in: int, n_out: int, pad: int) -> tuple[float, float]:
    # ndimage.zoom(grid_mode=True) samples output index o at input coordinate
    # (o + 0.5) * n_in / n_out - 0.5; `_square` pads (side - n) // 2 in front.
    scale = n_in / n_out
    return scale, 0.5 * scale - 0.5 - pad

  (sr, orow), (sc, ocol) = axis(side, size, (side - h_n) // 2), axis(side, size,
                                                                       (side - w_n) // 2)
  dz, dr, dc = volume.spacing_mm
  if data_config.mode == "3d":
    sz, oz = axis(z_n, int(data_config.depth), 0)
    to_source = np.array([[sz, 0, 0, oz], [0, sr, 0, orow], [0, 0, sc, ocol], [0, 0, 0, 1]])
    spacing = (dz * sz, dr * sr, dc * sc)
  else:
    to_source = np.array([[0, 0, 1, (z_n - 1) // 2], [sr, 0, 0, orow], [0, sc, 0, ocol],
                          [0, 0, 0, 1]], np.float64)
    spacing = (dr * sr, dc * sc)
  affine = None if volume.affine is None else volume.affine @ to_source
  return tuple(float(x) for x in spacing), affine


def plan(data_config) -> builders.Plan:
  validate(data_config)
  root = os.path.expanduser(data_config.source_dir)
  mods = builders.as_tuple(data_config.modalities)
  salt = data_config.get("id_salt") or DEFAULT_SALT
  policies = _policies(data_config)
  transforms = {m: transform_for(
      m, policies[m], ct_window=builders.as_tuple(data_config.ct_window),
      pet_max_suv=data_config.pet_max_suv,
      raw_range=builders.as_tuple(data_config.raw_range)) for m in mods}
  subjects, skipped, ignored = _discover(root, mods, salt)
  if not subjects and not skipped:
    raise ValueError(f"{root}: no subjects found (expected <subject>.nii.gz, "
                     f"<subject>/*.dcm or <subject>/<modality>.* entries)")
  fields, labels, unlabelled = _read_labels(data_config, list(subjects))
  # Read every subject once: corrupt files are skipped, fatal problems raise
  # here, before TFDS creates anything.
  counts, geometry = {}, {}
  for name in list(subjects):
    subject = subjects[name]
    try:
      examples, first = _load(subject, data_config, policies, transforms)
    except readers.BadFileError as e:
      skipped.append({"subject": subject.opaque, "reason": e.problem})
      log.warning("skipping subject %s: %s", subject.opaque, e.problem)
      del subjects[name]
      continue
    if not examples:
      skipped.append({"subject": subject.opaque, "reason": "no foreground slice"})
      log.warning("skipping subject %s: no foreground slice", subject.opaque)
      del subjects[name]
      continue
    counts[name] = len(examples)
    geometry[name] = _output_geometry(first, data_config)
  if not subjects:
    raise ValueError(f"{root}: every subject was skipped: "
                     f"{sorted({s['reason'] for s in skipped})}")
  if unlabelled:
    log.warning("%d subject(s) have no row in the labels CSV: their conditions "
                "are unknown (-1 / NaN)", unlabelled)

  fractions = builders.as_tuple(data_config.split_fractions)
  by_split = {s: [] for s in builders.SPLITS}
  for name in sorted(subjects, key=lambda n: subjects[n].opaque):
    by_split[builders.split_of(subjects[name].opaque, fractions)].append(name)
  spatial = builders.spatial_shape(data_config)
  features = {m: tfds.features.Tensor(shape=spatial, dtype=np.float32) for m in mods}
  for f in fields:
    features[f.name] = (tfds.features.ClassLabel(names=list(f.class_names))
                        if f.kind == CATEGORICAL else tfds.features.Scalar(np.float32))
  features["subject"] = tfds.features.Scalar(dtype=np.int64)

  def split_examples(names):
    def generate():
      for name in names:
        subject = subjects[name]
        examples, _ = _load(subject, data_config, policies, transforms)
        for i, ex in enumerate(examples):
          ex = dict(ex, subject=builders.int64_id(subject.opaque), **labels[name])
          yield f"{subject.opaque}_{i}", ex
    return generate

  splits = {s: split_examples(n) for s, n in by_split.items() if n}
  # Geometry of the subject whose spacing is nearest the median (ties: first
  # in opaque-id order): its spacing and affine go with every sample, so the
  # NIfTI header agrees with itself.
  ordered = sorted(geometry, key=lambda n: subjects[n].opaque)
  spacings = np.asarray([geometry[n][0] for n in ordered])
  median = np.median(spacings, axis=0)
  reference = ordered[int(np.argmin(np.abs(spacings - median).sum(axis=1)))]
  spacing_mm, affine = geometry[reference]
  info = DatasetInfo(
      name="medical_folder", image_shape=spatial + (len(mods),), modalities=mods,
      intensity=tuple(transforms[m] for m in mods), conditions=fields,
      spacing_mm=spacing_mm,
      extra={"intensity_policy": policies, "has_lesion_mask": False,
             "skipped_subjects": len(skipped),
             "affine": None if affine is None else affine.round(6).tolist()})
  reasons = {}
  for s in skipped:
    reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
  summary = {
      "name": "medical_folder", "config_name": config_name(data_config),
      "subjects": {s: len(n) for s, n in by_split.items() if n},
      "examples": {s: sum(counts[x] for x in n) for s, n in by_split.items() if n},
      "empty_splits": [s for s, n in by_split.items() if not n],
      "image_shape": list(info.image_shape), "modalities": list(mods),
      "spacing_mm": list(spacing_mm),
      "affine": None if affine is None else affine.round(6).tolist(),
      "intensity_policy": {m: transforms[m].description for m in mods},
      "conditions": [f.name for f in fields], "skipped": skipped,
      "skipped_counts": reasons, "ignored_files": ignored,
      "unlabelled_subjects": unlabelled,
      "default_id_salt": salt == DEFAULT_SALT}
  for s in summary["empty_splits"]:
    log.warning("split %r has no subjects (too few subjects for split_fractions)", s)
  return builders.Plan("medical_folder", summary["config_name"],
                       tfds.features.FeaturesDict(features), splits, info, summary)
