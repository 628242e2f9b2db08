"""PSNR/SSIM/MAE against hand-computed cases, 2D and three-plane 3D."""
import numpy as np
import pytest

from medgen_jax.metrics import paired

RANGE = (-1000.0, 1000.0)


def test_constant_offset_hand_computed():
  real = np.zeros((2, 16, 16, 1), np.float32)  # 0 HU -> 0.5 after rescale
  gen = real + 100.0                            # +0.05 after rescale
  out = paired.paired_metrics(real, gen, data_range=RANGE)
  assert out["psnr"] == pytest.approx(-10 * np.log10(0.05 ** 2), rel=1e-5)
  # SSIM of two constants a, b: (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2
  # (fp32 round-off in dm-pix's variances moves it by ~2e-4).
  a, b, c1 = 0.5, 0.55, 0.01 ** 2
  assert out["ssim"] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1),
                                      abs=5e-4)
  assert out["mae_body"] == pytest.approx(100.0)


def _ssim_numpy(x, y, size=11, sigma=1.5):
  # Float64 reference: separable Gaussian window, 'valid' convolution.
  t = np.arange(size) - size // 2
  g = np.exp(-0.5 * (t / sigma) ** 2)
  g /= g.sum()
  blur = lambda z: np.apply_along_axis(
      lambda r: np.convolve(r, g, "valid"), 0,
      np.apply_along_axis(lambda r: np.convolve(r, g, "valid"), 1, z))
  mx, my = blur(x), blur(y)
  sxx, syy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2
  sxy = blur(x * y) - mx * my
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  return np.mean((2 * mx * my + c1) * (2 * sxy + c2)
                 / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2)))


def test_ssim_and_psnr_match_numpy_reference():
  rng = np.random.default_rng(3)
  real = rng.uniform(-1000, 1000, size=(2, 24, 20, 1)).astype(np.float32)
  gen = real + rng.normal(0, 200, size=real.shape).astype(np.float32)
  out = paired.paired_metrics(real, gen, data_range=RANGE)
  r01 = np.clip((real.astype(np.float64) + 1000) / 2000, 0, 1)[..., 0]
  g01 = np.clip((gen.astype(np.float64) + 1000) / 2000, 0, 1)[..., 0]
  assert out["ssim"] == pytest.approx(
      np.mean([_ssim_numpy(r01[i], g01[i]) for i in range(2)]), abs=1e-4)
  assert out["psnr"] == pytest.approx(np.mean(
      [-10 * np.log10(np.mean((r01[i] - g01[i]) ** 2)) for i in range(2)]),
      rel=1e-4)


def test_identical_images():
  rng = np.random.default_rng(0)
  real = rng.uniform(-1000, 1000, size=(3, 20, 20, 1)).astype(np.float32)
  out = paired.paired_metrics(real, real.copy(), data_range=RANGE,
                              lesion_mask=np.ones((3, 20, 20), np.uint8))
  assert out["psnr"] == np.inf
  assert out["ssim"] == pytest.approx(1.0, abs=1e-5)
  assert out["mae_body"] == 0.0 and out["mae_lesion"] == 0.0


def test_masked_maes():
  real = np.zeros((1, 12, 12, 1), np.float32)
  gen = real.copy()
  gen[0, :6] = 50.0
  gen[0, 2:4, 2:4] = 250.0
  body = np.zeros((1, 12, 12), bool)
  body[0, :6] = True
  lesion = np.zeros((1, 12, 12), np.uint8)
  lesion[0, 2:4, 2:4] = 1
  out = paired.paired_metrics(real, gen, data_range=RANGE, body_mask=body,
                              lesion_mask=lesion)
  assert out["mae_body"] == pytest.approx((68 * 50 + 4 * 250) / 72)
  assert out["mae_lesion"] == pytest.approx(250.0)


def test_three_planes_hand_computed():
  d = 12
  real = np.zeros((1, d, 12, 14, 1), np.float32)
  gen = real.copy()
  gen[0, 5] = 200.0  # one whole axial slice is off by 0.1 in unit range
  out = paired.paired_metrics(real, gen, data_range=RANGE)
  # Axial: only slice 5 is finite: mse 0.01. Coronal/sagittal: every slice
  # holds one wrong row out of d: mse 0.01 / d.
  assert out["psnr_axial"] == pytest.approx(20.0, rel=1e-5)
  assert out["psnr_coronal"] == pytest.approx(20 + 10 * np.log10(d), rel=1e-5)
  assert out["psnr_sagittal"] == pytest.approx(20 + 10 * np.log10(d), rel=1e-5)
  assert out["psnr"] == pytest.approx(np.mean(
      [out["psnr_axial"], out["psnr_coronal"], out["psnr_sagittal"]]))
  assert out["ssim_axial"] < 1.0 and out["ssim_coronal"] < 1.0
  assert out["mae_body"] == pytest.approx(200.0 / d)


def test_validation():
  x = np.zeros((1, 16, 16, 1))
  with pytest.raises(ValueError, match="differ"):
    paired.paired_metrics(x, np.zeros((1, 16, 15, 1)), data_range=RANGE)
  with pytest.raises(ValueError, match="filter_size"):
    paired.paired_metrics(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1)),
                          data_range=RANGE)
  with pytest.raises(ValueError, match="data_range"):
    paired.paired_metrics(x, x, data_range=(1.0, 1.0))
