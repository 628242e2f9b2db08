"""Condition fidelity scores and the thresholding lesion-diameter rule."""
import numpy as np
import pytest

from medgen_jax.data.info import ConditionField
from medgen_jax.metrics import fidelity

FIELDS = (ConditionField("lesion", "categorical", num_classes=3),
          ConditionField("site", "categorical", num_classes=4),
          ConditionField("age", "continuous", value_range=(20.0, 90.0)))


def test_hand_computed_scores_and_unknowns():
  req = {"lesion": np.array([0, 1, 2, -1]), "site": np.array([3, 3, 0, 1]),
         "age": np.array([30.0, np.nan, 50.0, 70.0], np.float32)}
  pred = {"lesion": np.array([0, 2, 2, 0]), "site": np.array([3, 0, 0, 1]),
          "age": np.array([35.0, 0.0, 40.0, 71.0])}
  out = fidelity.condition_fidelity(pred, req, FIELDS)
  assert out["lesion_accuracy"] == pytest.approx(2 / 3)  # -1 skipped
  assert out["site_accuracy"] == pytest.approx(3 / 4)
  assert out["age_mae"] == pytest.approx((5 + 10 + 1) / 3)  # NaN skipped
  # Chance: requested lesion freq (1/3 each), predicted (1/3, 0, 2/3) -> 1/3.
  assert out["lesion_chance"] == pytest.approx(1 / 3)
  # Per requested class (no class names: indices): 0 -> right, 1 -> wrong,
  # 2 -> right; site 3 asked twice, right once; site 2 never asked: NaN.
  assert [out[f"lesion_accuracy_{c}"] for c in range(3)] == [1.0, 0.0, 1.0]
  assert out["site_accuracy_3"] == 0.5 and np.isnan(out["site_accuracy_2"])
  # Confusion rows: requested 1 was classified 2; site 3 -> {3, 0} half each.
  assert out["lesion_as_2_given_1"] == 1.0 and out["lesion_as_1_given_1"] == 0.0
  assert out["site_as_0_given_3"] == 0.5 and out["site_as_3_given_3"] == 0.5
  assert np.isnan(out["site_as_0_given_2"])


def test_condition_blind_generator_scores_chance():
  rng = np.random.default_rng(0)
  n = 4000
  req = {"lesion": rng.integers(0, 3, n), "site": rng.integers(0, 4, n),
         "age": rng.uniform(20, 90, n)}
  # Predictions independent of what was requested.
  pred = {"lesion": rng.integers(0, 3, n), "site": rng.integers(0, 4, n),
          "age": rng.uniform(20, 90, n)}
  out = fidelity.condition_fidelity(pred, req, FIELDS)
  assert out["lesion_accuracy"] == pytest.approx(1 / 3, abs=0.03)
  assert out["site_accuracy"] == pytest.approx(1 / 4, abs=0.03)
  assert out["lesion_accuracy"] == pytest.approx(out["lesion_chance"], abs=0.03)
  # E|U - V| for independent U(20, 90): 70 / 3.
  assert out["age_mae"] == pytest.approx(70 / 3, rel=0.05)
  perfect = fidelity.condition_fidelity(req, req, FIELDS)
  assert perfect["lesion_accuracy"] == 1.0 and perfect["age_mae"] == 0.0


def _synthetic_chest(size=96, nodules=()):
  """Soft-tissue body, two air-filled lungs, solid disks (centre, radius px)."""
  yy, xx = np.mgrid[:size, :size]
  img = np.full((size, size), -1000.0, np.float32)
  img[(yy - 48) ** 2 / 40 ** 2 + (xx - 48) ** 2 / 44 ** 2 < 1] = 40.0
  for cx in (28, 68):
    img[(yy - 48) ** 2 / 26 ** 2 + (xx - cx) ** 2 / 14 ** 2 < 1] = -850.0
  for (cy, cx), r in nodules:
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2] = 30.0
  return img


@pytest.mark.parametrize("radius,spacing", [(4, 1.0), (7, 0.7)])
def test_lesion_diameter_of_drawn_disk(radius, spacing):
  img = _synthetic_chest(nodules=[((40, 28), radius), ((56, 68), 2)])
  got = fidelity.lesion_diameter_from_image(img, spacing_mm=(spacing, spacing))
  # Largest component: the pixelated disk; its area in pixels is exact.
  area_px = np.sum((np.mgrid[:96, :96][0] - 40) ** 2
                   + (np.mgrid[:96, :96][1] - 28) ** 2 <= radius ** 2)
  assert got == pytest.approx(2 * np.sqrt(area_px / np.pi) * spacing, rel=1e-6)
  assert got == pytest.approx(2 * radius * spacing, rel=0.12)


def test_no_lesion_and_3d_sphere():
  assert fidelity.lesion_diameter_from_image(
      _synthetic_chest(), spacing_mm=(1.0, 1.0)) == 0.0
  # 3D: a stack of chest slices with a ball of radius 5 voxels in a lung.
  vol = np.stack([_synthetic_chest() for _ in range(16)])
  zz, yy, xx = np.mgrid[:16, :96, :96]
  ball = (zz - 8) ** 2 + (yy - 48) ** 2 + (xx - 28) ** 2 <= 25
  vol[ball] = 30.0
  got = fidelity.lesion_diameter_from_image(vol[..., None],
                                            spacing_mm=(2.0, 1.0, 1.0))
  assert got == pytest.approx((6 * ball.sum() * 2.0 / np.pi) ** (1 / 3))


def test_batch_error_and_validation():
  imgs = np.stack([_synthetic_chest(nodules=[((48, 28), 5)]),
                   _synthetic_chest()])
  out = fidelity.lesion_diameter_error(imgs, [10.0, 0.0], spacing_mm=(1, 1))
  assert out["measured_mm"][1] == 0.0
  assert out["lesion_diameter_mae"] == pytest.approx(
      abs(out["measured_mm"][0] - 10.0) / 2)
  with pytest.raises(ValueError, match="spacing_mm"):
    fidelity.lesion_diameter_from_image(imgs[0], spacing_mm=(1.0,))
  with pytest.raises(ValueError, match="lacks condition 'site'"):
    fidelity.condition_fidelity({"lesion": [0]}, {"lesion": [0]}, FIELDS[:2])
