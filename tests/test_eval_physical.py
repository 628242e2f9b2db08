"""Per-tissue HU Wasserstein distances and the CT body mask."""
import numpy as np
import pytest
import scipy.stats

from medgen_jax.metrics import physical


def _sorted_w1(a, b):
  # Exact W1 for equal-size samples: mean gap between sorted values.
  return float(np.mean(np.abs(np.sort(a.ravel()) - np.sort(b.ravel()))))


def _ct(rng, n=3, size=24):
  return rng.uniform(-1000, 1200, size=(n, size, size, 1)).astype(np.float32)


def test_paired_classes_come_from_real_image():
  rng = np.random.default_rng(0)
  real = _ct(rng)
  gen = real + rng.normal(0, 30, size=real.shape).astype(np.float32)
  out = physical.hu_distribution_distances(real, gen, paired=True)
  assert out["hu_w1"] == pytest.approx(_sorted_w1(real, gen), rel=1e-5)
  for name, (lo, hi) in physical.TISSUE_CLASSES.items():
    sel = (real >= lo) & (real < hi)
    assert out[f"hu_w1_{name}"] == pytest.approx(
        _sorted_w1(real[sel], gen[sel]), rel=1e-5)
  assert not any(k.startswith("hu_fraction") for k in out)


def test_shift_gives_w1_equal_to_shift():
  rng = np.random.default_rng(1)
  real = _ct(rng)
  out = physical.hu_distribution_distances(real, real + 7.0, paired=True)
  for key in ("hu_w1", "hu_w1_fat", "hu_w1_bone", "hu_w1_soft_tissue"):
    assert out[key] == pytest.approx(7.0, rel=1e-4), key
  same = physical.hu_distribution_distances(real, real, paired=False)
  assert all(v == pytest.approx(0.0, abs=1e-6) for v in same.values())


def test_unpaired_against_scipy_and_fractions():
  rng = np.random.default_rng(2)
  real, gen = _ct(rng, n=3), _ct(rng, n=5) * 0.9
  mask_r = np.zeros(real.shape[:-1], bool)
  mask_r[:, 4:20, 4:20] = True
  out = physical.hu_distribution_distances(real, gen, paired=False,
                                           real_mask=mask_r)
  r, g = real[..., 0], gen[..., 0]
  assert out["hu_w1"] == pytest.approx(
      scipy.stats.wasserstein_distance(r[mask_r], g.ravel()), rel=1e-6)
  fat_r = (r >= -200) & (r < -50) & mask_r
  fat_g = (g >= -200) & (g < -50)
  assert out["hu_w1_fat"] == pytest.approx(
      scipy.stats.wasserstein_distance(r[fat_r], g[fat_g]), rel=1e-6)
  assert out["hu_fraction_diff_fat"] == pytest.approx(
      fat_g.mean() - fat_r.sum() / mask_r.sum())


def test_empty_class_is_nan_and_validation():
  real = np.full((2, 16, 16), 40.0, np.float32)  # all soft tissue
  out = physical.hu_distribution_distances(real, real + 1, paired=True)
  assert np.isnan(out["hu_w1_bone"]) and out["hu_w1_soft_tissue"] == pytest.approx(1)
  with pytest.raises(ValueError, match="paired needs identical shapes"):
    physical.hu_distribution_distances(real, real[:1], paired=True)
  with pytest.raises(ValueError, match="real_mask shape"):
    physical.hu_distribution_distances(real, real, paired=True,
                                       real_mask=np.ones((2, 8, 8), bool))


def test_body_mask_fills_lungs_and_drops_table():
  img = np.full((64, 64), -1000.0, np.float32)
  yy, xx = np.mgrid[:64, :64]
  body = (yy - 30) ** 2 / 22 ** 2 + (xx - 32) ** 2 / 26 ** 2 < 1
  img[body] = 40.0
  img[((yy - 30) ** 2 + (xx - 22) ** 2) < 64] = -850.0  # a lung
  img[60:62, 5:60] = 200.0  # the table, disconnected
  mask = physical.body_mask(img)
  np.testing.assert_array_equal(mask, body)
  vol = physical.body_mask(np.stack([img, img]))
  np.testing.assert_array_equal(vol, np.stack([body, body]))
