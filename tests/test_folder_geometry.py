"""Samples in the scanner's geometry: the affine and spacing `medical_folder`
records, checked against an intensity that is a known function of the
scanner's world coordinates."""
import nibabel as nib
import numpy as np
import pytest

from configs import data_folder, folder_gan
from conftest import write_checkpoint, write_dicom_series
from medgen_jax import data
from medgen_jax.data import readers
from medgen_jax.inference import nifti, sample

SHAPE_XYZ = (24, 20, 6)             # NIfTI voxel axes: x 24, y 20, z 6
ZOOMS = (0.7, 1.3, 2.5)             # non-isotropic voxels (mm)


def _oblique_affine():
  """Rotated 20 deg about z and 10 deg about x, x axis flipped (stored L->R)."""
  cz, sz = np.cos(np.radians(20)), np.sin(np.radians(20))
  cx, sx = np.cos(np.radians(10)), np.sin(np.radians(10))
  rot = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array(
      [[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  a = np.eye(4)
  a[:3, :3] = rot @ np.diag([-ZOOMS[0], ZOOMS[1], ZOOMS[2]])
  a[:3, 3] = (35.0, -12.0, 40.0)
  return a


def _field(world):
  """The intensity at scanner position `world` [..., 3] (mm): linear, so
  linear resampling reproduces it exactly inside the scan."""
  return 400.0 + 3.0 * world[..., 0] - 2.0 * world[..., 1] + 1.5 * world[..., 2]


def _write_scan(path):
  affine = _oblique_affine()
  ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE_XYZ], indexing="ij"), -1)
  world = ijk @ affine[:3, :3].T + affine[:3, 3]
  nib.save(nib.Nifti1Image(_field(world).astype(np.float32), affine), str(path))
  return affine


def _config(src, out, mode):
  c = data_folder.get_config("quick")
  c.source_dir, c.data_dir, c.mode = str(src), str(out), mode
  c.split_fractions = (1.0, 0.0, 0.0)
  c.foreground_only = False
  c.modalities = ("mr",)
  c.intensity_policy = ("raw",)
  c.raw_range = (-1000.0, 2000.0)   # covers the field: values map back exactly
  return c


def _inside(affine_src, world):
  """Output voxels whose position lies inside the source scan (not padding)."""
  ijk = (world - affine_src[:3, 3]) @ np.linalg.inv(affine_src[:3, :3]).T
  return np.all((ijk >= 0) & (ijk <= np.asarray(SHAPE_XYZ) - 1), axis=-1)


def _one_scan_dataset(tmp_path, mode):
  """(the scan's affine, data config, DatasetInfo) of a folder holding one
  oblique scan, built in `mode`."""
  src = tmp_path / "src"
  src.mkdir()
  scan_affine = _write_scan(src / "a.nii.gz")
  config = _config(src, tmp_path / "out", mode)
  return scan_affine, config, data.load_info(config)


def _world(affine, shape):
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
  idx = np.concatenate([idx, np.zeros(idx.shape[:-1] + (3 - len(shape),))], -1)
  return idx @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def test_3d_examples_carry_the_scanner_affine(tmp_path):
  scan_affine, config, info = _one_scan_dataset(tmp_path, "3d")
  image = info.to_physical(data.load_arrays(config, split="train")["image"])[0, ..., 0]
  affine = np.asarray(info.extra["affine"])
  # Spacing: the source extent over the output size, per axis.
  np.testing.assert_allclose(info.spacing_mm, (2.5 * 6 / 8, 1.3 * 24 / 16, 0.7 * 24 / 16),
                             rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), info.spacing_mm,
                             rtol=1e-5)
  world = _world(affine, image.shape)
  inside = _inside(scan_affine, world)
  assert inside.sum() > 0.3 * inside.size
  np.testing.assert_allclose(image[inside], _field(world[inside]), atol=0.05)
  # The built volume is padded (20 rows -> 24): outside the scan it is not the field.
  assert not np.allclose(image[~inside], _field(world[~inside]), atol=1.0)


def test_2d_slices_carry_in_plane_spacing_and_orientation(tmp_path):
  scan_affine, config, info = _one_scan_dataset(tmp_path, "2d")
  np.testing.assert_allclose(info.spacing_mm, (1.3 * 24 / 16, 0.7 * 24 / 16), rtol=1e-6)
  slices = info.to_physical(data.load_arrays(config, split="train")["image"])[..., 0]
  assert slices.shape == (6, 16, 16)
  world = _world(info.extra["affine"], (16, 16))
  inside = _inside(scan_affine, world)
  errors = sorted(np.abs(s[inside] - _field(world[inside])).max() for s in slices)
  # The affine places the middle slice; its neighbours lie 2.5 mm away.
  assert errors[0] < 0.05 and errors[1] > 1.0


def test_nifti_written_with_the_affine_opens_aligned(tmp_path):
  affine = _oblique_affine() @ np.diag([1.5, 1.5, 1.5, 1.0])
  spacing = tuple(1.5 * z for z in ZOOMS)
  image = np.random.default_rng(0).normal(size=(6, 8, 5)).astype(np.float32)
  path = nifti.save_nifti(str(tmp_path / "x.nii.gz"), image, spacing, unit="HU",
                          affine=affine)
  img = nib.load(path)
  np.testing.assert_allclose(img.affine, affine, atol=1e-5)
  np.testing.assert_allclose(img.header.get_zooms(), spacing, rtol=1e-5)
  assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
  np.testing.assert_array_equal(np.asarray(img.dataobj), image)
  with pytest.raises(ValueError, match="disagree with spacing_mm"):
    nifti.save_nifti(str(tmp_path / "y.nii.gz"), image, (1.0, 1.0, 1.0), affine=affine)
  # Without an affine: spacing only, as before.
  plain = nib.load(nifti.save_nifti(str(tmp_path / "z.nii.gz"), image, spacing))
  np.testing.assert_allclose(plain.affine, np.diag(spacing + (1.0,)))


def test_dicom_series_affine_from_position_and_orientation(tmp_path):
  hu = np.random.default_rng(0).integers(-1000, 1000, (4, 5, 6)).astype(np.float32)
  write_dicom_series(tmp_path / "s", hu)  # rows/cols 0.8 mm, slices 2.5 mm along +z
  vol = readers.read_source(sorted(str(p) for p in (tmp_path / "s").iterdir()))
  for z, r, c in ((0, 0, 0), (3, 4, 5), (2, 1, 3)):
    # DICOM LPS (0.8 c, 0.8 r, 2.5 z) is RAS (-0.8 c, -0.8 r, 2.5 z).
    np.testing.assert_allclose(vol.affine @ [z, r, c, 1], [-0.8 * c, -0.8 * r, 2.5 * z, 1],
                               atol=1e-9)


@pytest.mark.slow  # compiles the quick 3D generator (~30 s on the shared CPU)
def test_sampled_volumes_are_written_in_the_scanner_geometry(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for i in range(3):
    _write_scan(src / f"s{i}.nii.gz")
  config = folder_gan.get_config("quick,3d")
  config.data.update(dict(_config(src, tmp_path / "out", "3d")))
  write_checkpoint(config, str(tmp_path / "run"))
  summary = sample.sample(config, str(tmp_path / "run"), num_samples=2,
                          out_dir=str(tmp_path / "samples"), batch_size=2)
  info = data.load_info(config.data)
  for name in summary["files"]:
    img = nib.load(str(tmp_path / "samples" / name))
    assert img.shape == (8, 16, 16)
    np.testing.assert_allclose(img.affine, info.extra["affine"], atol=1e-5)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(
        np.asarray(info.extra["affine"]))
  np.testing.assert_allclose(summary["affine"], info.extra["affine"])
