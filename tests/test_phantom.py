"""The CT/PET phantom: tissue HU, exact lesion ground truth, age and site."""
import numpy as np
import pytest
from scipy import ndimage

from medgen_jax.data import phantom

T = phantom.TISSUES


def _slices(seed, n=4, size=96, **kw):
  return phantom.subject_examples(seed, image_size=size, mode="2d", depth=0,
                                  slices_per_subject=n, **kw)


def _render(age=50.0, site=0, lesion=0, seed=0, size=96):
  rng = np.random.default_rng(seed)
  anatomy = phantom.sample_anatomy(rng)
  return phantom.render(anatomy, image_size=size, z_mm=np.array([100.0]),
                        lesion=lesion, age=age, site=site, rng=rng)


def _interior(tissue, label, iterations=2):
  return ndimage.binary_erosion(tissue == label, iterations=iterations)


@pytest.mark.parametrize("name,lo,hi", [
    ("air", -1010, -990), ("fat", -130, -70), ("muscle", 20, 60),
    ("lung", -900, -800), ("blood", 30, 70), ("cortical", 400, 1100),
    ("trabecular", 400, 1000)])
def test_tissue_hu_ranges(name, lo, hi):
  ex = _render(site=0, size=128)
  region = _interior(ex["tissue"][0], T[name], 1 if name in ("cortical", "trabecular") else 2)
  assert region.sum() > 3, name
  median = np.median(ex["ct"][0][region])
  assert lo <= median <= hi, (name, median)
  assert ex["ct"].dtype == np.int16


def test_pet_uptake():
  ex = _render(size=96)
  pet, tissue = ex["pet"][0], ex["tissue"][0]
  assert 0.4 <= np.median(pet[_interior(tissue, T["muscle"], 1)]) <= 1.1
  heart = _interior(tissue, T["heart"], 3)
  if heart.any():  # the heart is only present in the lower chest.
    assert 2.5 <= np.median(pet[heart]) <= 5.5
  assert pet[tissue == T["air"]].max() < 0.5


def test_lesions_inside_lung_and_diameter_matches_mask():
  spacing = phantom.FOV_MM / 96
  seen = set()
  for seed in range(6):
    for ex in _slices(seed, n=5):
      mask = ex["lesion_mask"].astype(bool)
      seen.add(ex["lesion"])
      if ex["lesion"] == 0:
        assert not mask.any() and ex["lesion_diameter_mm"] == 0
        continue
      lung = np.isin(ex["tissue"], (T["lung"], T["vessel"]))
      assert mask.any() and np.all(lung[mask])
      lo, hi = (phantom.SMALL_DIAMETER_MM if ex["lesion"] == 1
                else phantom.LARGE_DIAMETER_MM)
      assert lo <= ex["lesion_diameter_mm"] <= hi
      labels, n = ndimage.label(mask)
      areas = ndimage.sum(mask, labels, range(1, n + 1)) * spacing ** 2
      eq_diameter = 2 * np.sqrt(areas.max() / np.pi)
      assert abs(eq_diameter - ex["lesion_diameter_mm"]) <= spacing, (
          eq_diameter, ex["lesion_diameter_mm"])
      # The nodule is drawn at +30 HU on a ~-850 HU lung: clearly visible.
      assert ex["ct"][mask].mean() > -600
      assert ex["pet"][mask].max() > 1.5
  assert seen == {0, 1, 2}


def test_3d_lesion_is_a_sphere():
  for seed in range(8):
    ex = phantom.subject_examples(seed, image_size=48, mode="3d", depth=24,
                                  slices_per_subject=1)[0]
    if ex["lesion"] == 2:
      break
  dz, dy, dx = phantom.spacing_mm(48, mode="3d", depth=24)
  volume = ex["lesion_mask"].sum() * dz * dy * dx
  d = ex["lesion_diameter_mm"]
  assert ex["ct"].shape == (24, 48, 48)
  assert volume == pytest.approx(np.pi / 6 * d ** 3, rel=0.6)
  assert (ex["lesion_mask"].sum(axis=(1, 2)) > 0).sum() >= 2  # spans slices.


def test_age_lowers_bone_and_lung_hu():
  young, old = _render(age=25, size=128), _render(age=85, size=128)
  tissue = young["tissue"][0]  # same seed: same anatomy.
  np.testing.assert_array_equal(tissue, old["tissue"][0])
  bone = _interior(tissue, T["trabecular"], 1)
  lung = _interior(tissue, T["lung"])
  drop_bone = young["ct"][0][bone].mean() - old["ct"][0][bone].mean()
  drop_lung = young["ct"][0][lung].mean() - old["ct"][0][lung].mean()
  expect = np.subtract(phantom.bone_hu(25), phantom.bone_hu(85))[1]
  assert drop_bone == pytest.approx(expect, rel=0.25)
  assert drop_lung == pytest.approx(phantom.lung_hu(25) - phantom.lung_hu(85), abs=15)


def test_sites_differ_in_noise_and_offset():
  stats = []
  for site in range(len(phantom.SITES)):
    ex = _render(site=site, size=128)
    blood = _interior(ex["tissue"][0], T["blood"], 2)  # the largest flat region.
    assert blood.sum() > 50
    values = ex["ct"][0][blood].astype(np.float64)
    stats.append((values.std(), values.mean() - 50.0))
  for (std, offset), s in zip(stats, phantom.SITES):
    assert std == pytest.approx(s.noise_hu, rel=0.3)
    assert offset == pytest.approx(s.offset_hu, abs=6)
  assert stats[-1][0] > 3 * stats[0][0]


def test_deterministic_and_seed_dependent():
  a, b, c = _slices((1, 2), n=2), _slices((1, 2), n=2), _slices((1, 3), n=2)
  for x, y in zip(a, b):
    for k in ("ct", "pet", "lesion_mask"):
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["ct"], c[0]["ct"])
