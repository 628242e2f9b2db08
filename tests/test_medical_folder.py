"""medical_folder builds from tiny NIfTI / DICOM / NPY folders the tests write."""
import csv
import json
import os

import numpy as np
import pytest

from configs import data_folder
from conftest import ct_volume, write_dicom_series, write_nifti
from medgen_jax import data
from medgen_jax.data import builders, readers


def folder_config(source, out, **overrides):
  c = data_folder.get_config("quick")
  c.source_dir, c.data_dir = str(source), str(out)
  c.split_fractions = (0.6, 0.2, 0.2)
  c.foreground_only = False
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def test_dicom_reader_sorts_slices_and_rescales(tmp_path):
  hu = np.stack([np.full((4, 5), 100.0 * k - 500) for k in range(5)])
  write_dicom_series(tmp_path / "s", hu, slope=2.0, intercept=-1024.0)
  vol = readers.read_source(sorted(str(p) for p in (tmp_path / "s").iterdir()))
  np.testing.assert_allclose(vol.array, hu)
  assert vol.spacing_mm == (2.5, 0.8, 0.8)


def test_nifti_reader_roundtrip_orientation(tmp_path):
  v = np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32)
  write_nifti(tmp_path / "a.nii.gz", v, spacing=(3.0, 1.5, 1.25))
  vol = readers.read_source([str(tmp_path / "a.nii.gz")])
  np.testing.assert_allclose(vol.array, v, rtol=1e-6)
  assert vol.spacing_mm == (3.0, 1.5, 1.25)


def test_flat_nifti_and_dicom_2d_with_labels(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  names = [f"sub{i:02d}" for i in range(6)]
  for i, n in enumerate(names[:3]):
    write_nifti(src / f"{n}.nii.gz", ct_volume(i))
  for i, n in enumerate(names[3:]):
    write_dicom_series(src / n, ct_volume(10 + i))
  with open(tmp_path / "labels.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["subject", "diagnosis", "age"])
    for i, n in enumerate(names):
      w.writerow([n, ["healthy", "tumour"][i % 2], 30 + 10 * i])
  c = folder_config(src, tmp_path / "out", labels_csv=str(tmp_path / "labels.csv"))
  summary = data.build(c)
  assert sum(summary["subjects"].values()) == 6
  assert sum(summary["examples"].values()) == 6 * 6  # every slice kept.
  info = data.load_info(c)
  assert info.image_shape == (16, 16, 1)
  assert [(f.name, f.kind) for f in info.conditions] == [
      ("diagnosis", "categorical"), ("age", "continuous")]
  assert info.condition("diagnosis").class_names == ("healthy", "tumour")
  assert info.condition("age").value_range == (30.0, 80.0)
  # Every stored example carries its own subject's labels, and the image
  # round-trips to HU: the 600 HU core survives the resize.
  ages, diagnoses = [], []
  for split in summary["subjects"]:
    arrays = data.load_arrays(c, split=split)
    hu = info.to_physical(arrays["image"])
    assert hu.min() == pytest.approx(-1000, abs=5) and hu.max() > 500
    ages += list(arrays["age"])
    diagnoses += list(arrays["diagnosis"])
  expect = {30 + 10 * i: i % 2 for i in range(6)}
  assert sorted(set(ages)) == sorted(expect)
  for a, d in zip(ages, diagnoses):
    assert expect[int(a)] == d


def test_paired_modalities_3d_and_subject_split(tmp_path):
  src = tmp_path / "src"
  for i in range(5):
    d = src / f"case{i}"
    d.mkdir(parents=True)
    t1 = np.zeros((10, 12, 12), np.float32)
    t1[2:8, 3:9, 3:9] = 100.0 + 10.0 * np.arange(6)[:, None, None] + i
    write_nifti(d / "t1.nii.gz", t1)
    np.save(d / "t2.npy", 2 * t1)  # NPY channel on the same grid.
  c = folder_config(src, tmp_path / "out", mode="3d", modalities=("t1,t2",))
  summary = data.build(c)
  info = data.load_info(c)
  assert info.image_shape == (8, 16, 16, 2)
  assert info.extra["intensity_policy"] == {"t1": "percentile", "t2": "percentile"}
  subjects = {}
  for split in summary["subjects"]:
    it, _ = data.load_dataset(c, split=split, batch_size=1, seed=0, shuffle=False,
                              num_epochs=1)
    for batch in it:
      # Percentile normalisation makes both channels identical here (t2 = 2 t1).
      np.testing.assert_allclose(batch["image"][..., 0], batch["image"][..., 1],
                                 atol=1e-5)
      assert batch["image"].min() == -1.0 and batch["image"].max() > 0.5
  # Splits are disjoint sets of subjects that cover every subject.
  src_builder = builders.read_builder(summary["builder_dir"])
  for split in summary["subjects"]:
    ds = src_builder.as_data_source(split=split)
    subjects[split] = {int(ds[i]["subject"]) for i in range(len(ds))}
  all_ids = [s for v in subjects.values() for s in v]
  assert len(all_ids) == len(set(all_ids)) == 5


def test_build_dataset_cli_writes_summary(tmp_path):
  import subprocess
  import sys
  src = tmp_path / "src"
  src.mkdir()
  for i in range(3):
    write_nifti(src / f"p{i}.nii", ct_volume(i))
  out = tmp_path / "out"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(
      [sys.executable, "-m", "experiments.build_dataset", "--config",
       "configs/data_folder.py:quick", f"--config.source_dir={src}",
       f"--config.data_dir={out}", "--config.mode=3d", "--config.modalities=ct"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["image_shape"] == [8, 16, 16, 1]
  assert sum(summary["subjects"].values()) == 3
  assert "HU" in summary["intensity_policy"]["ct"]


# ----------------------------------------------------------------- bad input


def _no_complete_dataset(out):
  """Nothing under `out` looks like a finished dataset."""
  for _, _, files in os.walk(out):
    assert "dataset_info.json" not in files


def _flat_nifti(src, n=4, start=0):
  src.mkdir(parents=True, exist_ok=True)
  for i in range(start, start + n):
    write_nifti(src / f"s{i}.nii.gz", ct_volume(i))


def test_empty_folder_fails(tmp_path):
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "notes.txt").write_text("nothing here")
  with pytest.raises(ValueError, match="no subjects found"):
    data.build(folder_config(tmp_path / "src", tmp_path / "out"))
  _no_complete_dataset(tmp_path / "out")


def test_missing_source_dir_fails(tmp_path):
  with pytest.raises(ValueError, match="is not a directory"):
    data.build(folder_config(tmp_path / "nope", tmp_path / "out"))


def test_corrupt_files_are_skipped_and_counted(tmp_path):
  src = tmp_path / "src"
  _flat_nifti(src, 4)
  good = (src / "s0.nii.gz").read_bytes()
  (src / "s1.nii.gz").write_bytes(good[: len(good) // 2])  # truncated.
  write_dicom_series(src / "dcm", ct_volume(7))
  first = sorted((src / "dcm").iterdir())[0]
  first.write_bytes(first.read_bytes()[:200])  # truncated DICOM.
  summary = data.build(folder_config(src, tmp_path / "out"))
  assert sum(summary["subjects"].values()) == 3
  assert summary["skipped_counts"] == {"not a readable NIfTI file": 1,
                                       "not a readable DICOM image": 1}
  assert {s["subject"] for s in summary["skipped"]} == {
      readers.opaque_id("s1", data_folder.get_config().id_salt),
      readers.opaque_id("dcm", data_folder.get_config().id_salt)}


def test_all_corrupt_fails(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "a.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
  with pytest.raises(ValueError, match="every subject was skipped"):
    data.build(folder_config(src, tmp_path / "out"))
  _no_complete_dataset(tmp_path / "out")


def test_nan_voxels_fail_naming_the_file(tmp_path):
  src = tmp_path / "src"
  _flat_nifti(src, 3)
  v = ct_volume(5)
  v[2, 3, 3] = np.nan
  v[1, 1, 1] = np.inf
  write_nifti(src / "s9.nii.gz", v)
  with pytest.raises(ValueError, match=r"s9\.nii\.gz: 2 NaN/inf voxels"):
    data.build(folder_config(src, tmp_path / "out"))
  _no_complete_dataset(tmp_path / "out")


def test_unalignable_shapes_fail(tmp_path):
  src = tmp_path / "src"
  (src / "a").mkdir(parents=True)
  write_nifti(src / "a" / "t1.nii.gz", ct_volume(0, (6, 20, 24)))
  write_nifti(src / "a" / "t2.nii.gz", ct_volume(0, (6, 20, 20)))
  with pytest.raises(ValueError, match="paired modalities have different shapes"):
    data.build(folder_config(src, tmp_path / "out", modalities=("t1", "t2")))
  _no_complete_dataset(tmp_path / "out")
  # A DICOM series mixing slice sizes cannot be stacked.
  src2 = tmp_path / "src2"
  write_dicom_series(src2 / "p", ct_volume(0, (3, 8, 8)))
  write_dicom_series(src2 / "p" / "..", ct_volume(0, (1, 8, 10)), shuffle_names=False)
  os.rename(src2 / "IM0000.dcm", src2 / "p" / "IM9999.dcm")
  with pytest.raises(ValueError, match="mixes slice shapes"):
    data.build(folder_config(src2, tmp_path / "out2"))
  # A 2D PNG cannot become a 3D volume.
  from PIL import Image
  src3 = tmp_path / "src3"
  src3.mkdir()
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(src3 / "x.png")
  with pytest.raises(ValueError, match=r"x\.png: a 2D image cannot be resampled"):
    data.build(folder_config(src3, tmp_path / "out3", mode="3d"))


def test_csv_unknown_subjects_fail(tmp_path):
  src = tmp_path / "src"
  _flat_nifti(src, 3)
  (tmp_path / "l.csv").write_text("subject,age\ns0,40\ns1,50\nghost,60\n")
  with pytest.raises(ValueError, match=r"l\.csv: 1 row\(s\) name subjects not found"):
    data.build(folder_config(src, tmp_path / "out", labels_csv=str(tmp_path / "l.csv")))
  _no_complete_dataset(tmp_path / "out")


def test_csv_unseen_class_fails(tmp_path):
  src = tmp_path / "src"
  _flat_nifti(src, 3)
  (tmp_path / "l.csv").write_text("subject,dx\ns0,healthy\ns1,tumour\ns2,other\n")
  c = folder_config(src, tmp_path / "out", labels_csv=str(tmp_path / "l.csv"))
  c.class_names = {"dx": "healthy,tumour"}
  with pytest.raises(ValueError, match=r"l\.csv:4: column 'dx' value 'other'"):
    data.build(c)
  _no_complete_dataset(tmp_path / "out")


def test_failure_while_writing_leaves_no_complete_dataset(tmp_path, monkeypatch):
  """A crash after TFDS started writing: its incomplete dir is removed."""
  from medgen_jax.data import builders_folder
  src = tmp_path / "src"
  _flat_nifti(src, 4)
  real_load, calls = builders_folder._load, []

  def flaky(*args, **kwargs):
    calls.append(1)
    if len(calls) > 5:  # the 4 checks in plan() pass, writing then fails.
      raise OSError("disk full")
    return real_load(*args, **kwargs)

  monkeypatch.setattr(builders_folder, "_load", flaky)
  with pytest.raises(OSError, match="disk full"):
    data.build(folder_config(src, tmp_path / "out"))
  _no_complete_dataset(tmp_path / "out")
  leftovers = [d for _, dirs, _ in os.walk(tmp_path / "out") for d in dirs
               if d.startswith("incomplete")]
  assert not leftovers
  monkeypatch.setattr(builders_folder, "_load", real_load)
  assert sum(data.build(folder_config(src, tmp_path / "out"))["subjects"].values()) == 4
