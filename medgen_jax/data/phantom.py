"""Procedural chest CT (HU) + PET (SUV) phantom with exact ground truth.

Every subject is an anatomy drawn from `sample_anatomy`; `render` turns it into
axial slices or a volume on a [Z, H, W] grid in millimetres, all tissues drawn
as (rotated) ellipses evaluated with numpy broadcasting, so thousands of 64x64
slices take a few seconds. The conditions are exact by construction:

* lesion: 0 none, 1 small (one or two 8-15 mm nodules), 2 large (one 25-40 mm
  nodule or mass), spheres of +30 HU placed inside a lung; `lesion_mask` is the
  rasterised sphere(s) and `lesion_diameter_mm` the largest nominal diameter.
* age (20-90 y): trabecular and cortical bone lose density (HU falls linearly)
  and lung parenchyma gets darker, both measurable from the tissue map.
* site (0-3): acquisition sites differ in reconstruction blur, noise sigma and
  a HU calibration offset (`SITES`).

Image rows run anterior (top) to posterior, columns patient right to left
(radiological convention); the field of view is `FOV_MM` whatever the size.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import ndimage

FOV_MM = 350.0
# Slab of the chest rendered in 3D mode (mm, lung base at z = 0).
CHEST_Z_MM = (40.0, 200.0)
AGE_RANGE = (20.0, 90.0)
LESION_CLASSES = ("none", "small", "large")
# Sized so the classes stay apart at the default 64x64 slice (5.5 mm pixels):
# nodules of 5-10 mm / 12-25 mm cover 1-10 pixels, the size of the vessel
# cross-sections around them, and a classifier trained on such slices did not
# tell the classes apart. A large lesion covers 16-42 pixels; a small one
# (2-6 pixels) still looks like a vessel at 64x64 and needs 128+ pixel slices
# to be seen (docs/results.md, teacher options).
SMALL_DIAMETER_MM = (8.0, 15.0)
LARGE_DIAMETER_MM = (25.0, 40.0)
NODULE_HU = 30.0
HU_CLIP = (-1024, 3071)


@dataclasses.dataclass(frozen=True)
class Site:
  """Acquisition properties of one scanner site (the domain shift)."""
  noise_hu: float
  blur_mm: float
  offset_hu: float


SITES = (Site(8.0, 0.4, 0.0), Site(18.0, 1.0, 12.0),
         Site(30.0, 1.6, -10.0), Site(45.0, 2.2, 22.0))

# Tissue labels of the `tissue` map returned by `render` (tests, evaluation).
TISSUES = {"air": 0, "fat": 1, "muscle": 2, "lung": 3, "vessel": 4,
           "heart": 5, "blood": 6, "cortical": 7, "trabecular": 8, "skin": 9}


def bone_hu(age: float) -> tuple[float, float]:
  """(cortical, trabecular) HU at `age`: both lose ~4 HU per year after 20."""
  years = float(age) - AGE_RANGE[0]
  return 1000.0 - 2.0 * years, 700.0 - 4.0 * years


def lung_hu(age: float) -> float:
  """Parenchyma HU: darker (more air) with age, -820 at 20 y to -890 at 90 y."""
  return -820.0 - 1.0 * (float(age) - AGE_RANGE[0])


def sample_anatomy(rng: np.random.Generator) -> dict[str, float]:
  """Random per-subject anatomy (all lengths in mm)."""
  u = rng.uniform
  return {
      "body_a": u(135, 165), "body_b": u(95, 120), "fat": u(8, 24),
      "muscle": u(10, 18), "lung_a": u(0.30, 0.36), "lung_b": u(0.58, 0.70),
      "lung_x": u(0.42, 0.50), "heart_a": u(0.26, 0.34), "heart_b": u(0.30, 0.38),
      "heart_x": u(0.05, 0.16), "heart_rot": u(-0.6, -0.2), "spine_r": u(13, 19),
      "rib_phase": u(0, 2 * np.pi), "pet_heart": u(3.0, 5.0),
      "z_phase": u(0, 2 * np.pi)}


def _ellipse(x, y, cx, cy, a, b, rot=0.0):
  """Boolean ellipse mask; arguments broadcast over [Z, H, W]."""
  if rot == 0.0:  # the common axis-aligned case, without the rotation.
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0
  c, s = np.cos(rot), np.sin(rot)
  u = (x - cx) * c + (y - cy) * s
  v = -(x - cx) * s + (y - cy) * c
  return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _nodules(rng, lesion: int, lungs: np.ndarray, sampling: tuple[float, ...]):
  """Nodule voxel centres and diameters, each sphere wholly inside the lung.

  Centres are drawn among lung voxels whose distance to the nearest non-lung
  voxel exceeds the radius plus one voxel, so the rasterised sphere is never
  cut by the pleura and its size matches the nominal diameter.

  Args:
    rng: generator.
    lesion: class index (0 none, 1 small, 2 large).
    lungs: bool [H, W] or [D, H, W] lung mask.
    sampling: voxel spacing (mm) per axis of `lungs`.

  Returns:
    [(centre index tuple, diameter_mm)].
  """
  if lesion == 0:
    return []
  count = 1 if lesion == 2 else int(rng.integers(1, 3))
  lo, hi = SMALL_DIAMETER_MM if lesion == 1 else LARGE_DIAMETER_MM
  depth = ndimage.distance_transform_edt(lungs, sampling=sampling)
  out = []
  for _ in range(count):
    d = float(rng.uniform(lo, hi))
    room = depth > d / 2 + max(sampling)
    if not room.any():  # lung too small here: the largest nodule that fits.
      room = depth >= depth.max()
      d = float(np.clip(2 * (depth.max() - max(sampling)), lo, d))
    candidates = np.argwhere(room)
    out.append((tuple(candidates[rng.integers(len(candidates))]), d))
  return out


def render(anatomy: dict[str, float], *, image_size: int, z_mm: np.ndarray,
           lesion: int, age: float, site: int, rng: np.random.Generator,
           z_spacing_mm: float = 0.0) -> dict[str, np.ndarray]:
  """Renders a subject on Z axial planes at heights `z_mm`.

  Args:
    anatomy: from `sample_anatomy`.
    image_size: H = W in voxels; the field of view is FOV_MM.
    z_mm: [Z] heights of the planes (mm); Z independent 2D slices when
      `z_spacing_mm` is 0, else one contiguous volume (blur is then 3D).
    lesion: class index into LESION_CLASSES; for independent slices one per
      plane ([Z] or a scalar), for a volume a scalar.
    age: years, in AGE_RANGE.
    site: index into SITES.
    rng: source of nodule placement, texture and noise.
    z_spacing_mm: slice spacing of a volume (0 for independent slices).

  Returns:
    ct: int16 [Z, H, W] HU; pet: float32 [Z, H, W] SUV; lesion_mask: uint8
    [Z, H, W]; tissue: uint8 [Z, H, W] (TISSUES labels, noise-free truth);
    lesion_diameter_mm: float32 [Z] for slices, [1] for a volume (largest
    nodule's nominal diameter, 0 if none).
  """
  n = image_size
  spacing = FOV_MM / n
  z_mm = np.asarray(z_mm, np.float64)
  coords = ((np.arange(n) + 0.5) * spacing - FOV_MM / 2).astype(np.float32)
  x = coords[None, None, :]
  y = coords[None, :, None]
  z = z_mm[:, None, None].astype(np.float32)
  a = anatomy
  # Shapes breathe along z: a smooth per-subject wobble plus lungs tapering
  # towards apex and base.
  wob = 1.0 + 0.04 * np.sin(z / 37.0 + a["z_phase"])
  taper = np.sqrt(np.clip(1 - ((z - 120.0) / 150.0) ** 2, 0.2, 1))
  ba, bb = a["body_a"] * wob, a["body_b"] * wob
  body = _ellipse(x, y, 0, 0, ba, bb)
  inner = _ellipse(x, y, 0, 0, ba - 2.0, bb - 2.0)
  fat_in = _ellipse(x, y, 0, 0, ba - a["fat"], bb - a["fat"])
  chest = _ellipse(x, y, 0, 0, ba - a["fat"] - a["muscle"],
                   bb - a["fat"] - a["muscle"])
  la, lb = a["lung_a"] * ba * taper, a["lung_b"] * bb * taper
  lx, ly = a["lung_x"] * ba, -0.05 * bb
  lungs = (_ellipse(x, y, -lx, ly, la, lb) | _ellipse(x, y, lx, ly, la, lb))
  heart_on = z < 130.0  # heart only in the lower chest.
  heart = _ellipse(x, y, a["heart_x"] * ba, -0.2 * bb, a["heart_a"] * ba,
                   a["heart_b"] * bb, a["heart_rot"]) & heart_on
  blood = _ellipse(x, y, a["heart_x"] * ba, -0.2 * bb, a["heart_a"] * ba * 0.6,
                   a["heart_b"] * bb * 0.6, a["heart_rot"]) & heart_on
  sy = 0.55 * bb
  aorta = _ellipse(x, y, 0.16 * ba, sy - 0.45 * bb, 12.0, 12.0)
  r = a["spine_r"]
  spine = _ellipse(x, y, 0, sy, r, r * 0.9) | _ellipse(x, y, 0, sy + 1.6 * r,
                                                       0.35 * r, 0.9 * r)
  marrow = _ellipse(x, y, 0, sy, r - 3.0, r * 0.9 - 3.0)
  # Ribs: short bony ellipses on the chest-wall ring whose angles drift with z.
  ring_a = ba - a["fat"] - 0.5 * a["muscle"]
  ring_b = bb - a["fat"] - 0.5 * a["muscle"]
  # Only voxels near the ring can be rib: evaluate the 10 rib ellipses there.
  band = (_ellipse(x, y, 0, 0, ring_a + 8.0, ring_b + 8.0)
          & ~_ellipse(x, y, 0, 0, ring_a - 8.0, ring_b - 8.0))
  iz, iy, ix = np.nonzero(band)
  theta = (a["rib_phase"] + np.arange(10)[:, None] * 2 * np.pi / 10
           + z_mm[iz][None, :] / 60.0)  # [rib, band voxels]
  c, s = np.cos(theta), np.sin(theta)
  dx, dy = coords[ix] - ring_a[iz, 0, 0] * c, coords[iy] - ring_b[iz, 0, 0] * s
  u, v = (dx * c + dy * s) ** 2, (dy * c - dx * s) ** 2
  visible = np.abs(s) > 0.3  # no ribs right at the sternum or the spine.
  ribs = np.zeros(band.shape, bool)
  rib_marrow = np.zeros(band.shape, bool)
  ribs[iz, iy, ix] = ((u / 49.0 + v / 20.25 <= 1) & visible).any(0)
  rib_marrow[iz, iy, ix] = ((u / 16.0 + v / 4.0 <= 1) & visible).any(0)
  lungs &= chest & ~heart & ~aorta & ~spine & ~ribs

  tissue = np.zeros(body.shape, np.uint8)
  tissue[body] = TISSUES["skin"]
  tissue[inner] = TISSUES["fat"]
  tissue[fat_in] = TISSUES["muscle"]
  tissue[chest] = TISSUES["fat"]  # mediastinal fat between organs.
  tissue[lungs] = TISSUES["lung"]
  tissue[heart] = TISSUES["heart"]
  tissue[blood | aorta] = TISSUES["blood"]
  tissue[spine | ribs] = TISSUES["cortical"]
  tissue[marrow | rib_marrow] = TISSUES["trabecular"]

  # Vessel texture: a smooth random field thresholded into tortuous tubes,
  # denser near the hila (medial lung).
  sigma_px = 1.8 / spacing + 0.6
  field = rng.standard_normal(body.shape).astype(np.float32)
  field = ndimage.gaussian_filter(
      field, (sigma_px if z_spacing_mm else 0.0, sigma_px, sigma_px))
  field /= field.std() + 1e-6
  hilum = np.exp(-np.minimum(np.abs(x - lx), np.abs(x + lx)) / (0.6 * la))
  vessels = lungs & (field * (0.6 + 0.6 * hilum) > 1.3)
  tissue[vessels] = TISSUES["vessel"]

  cortical, trabecular = bone_hu(age)
  hu_table = np.zeros(len(TISSUES), np.float32)
  for name, value in (("air", -1000.0), ("fat", -100.0), ("muscle", 40.0),
                      ("lung", lung_hu(age)), ("vessel", 40.0), ("heart", 40.0),
                      ("blood", 50.0), ("cortical", cortical),
                      ("trabecular", trabecular), ("skin", 20.0)):
    hu_table[TISSUES[name]] = value
  suv_table = np.zeros(len(TISSUES), np.float32)
  for name, value in (("fat", 0.5), ("muscle", 0.9), ("lung", 0.5),
                      ("vessel", 1.2), ("heart", a["pet_heart"]), ("blood", 1.6),
                      ("cortical", 0.6), ("trabecular", 1.0), ("skin", 0.7)):
    suv_table[TISSUES[name]] = value
  ct = hu_table[tissue]
  pet = suv_table[tissue]

  mask = np.zeros(body.shape, bool)
  if z_spacing_mm:  # one volume: spheres may span several planes.
    groups = [(None, int(np.asarray(lesion).reshape(-1)[0]))]
  else:  # independent slices: one lesion class per plane.
    groups = list(enumerate(np.broadcast_to(lesion, z_mm.shape).tolist()))
  diameter = np.zeros(len(groups), np.float32)
  for g, (plane, les) in enumerate(groups):
    if plane is None:
      found = _nodules(rng, les, lungs, (z_spacing_mm, spacing, spacing))
    else:
      found = [((plane,) + c, d) for c, d in _nodules(rng, les, lungs[plane],
                                                      (spacing, spacing))]
    for (iz, iy, ix), d in found:
      cx, cy = float(coords[ix]), float(coords[iy])
      if plane is None:
        cz = float(z[iz, 0, 0])
        sphere = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= (d / 2) ** 2
      else:  # the nodule's equator lies on this plane.
        sphere = np.zeros_like(mask)
        sphere[plane] = (x[0] - cx) ** 2 + (y[0] - cy) ** 2 <= (d / 2) ** 2
      sphere &= lungs
      mask |= sphere
      ct[sphere] = NODULE_HU
      pet[sphere] = rng.uniform(4.0, 10.0)
      diameter[g] = max(diameter[g], d)

  s = SITES[site]
  blur = s.blur_mm / spacing
  z_blur = s.blur_mm / z_spacing_mm if z_spacing_mm else 0.0
  ct = ndimage.gaussian_filter(ct, (z_blur, blur, blur))
  ct = ct + s.offset_hu + rng.normal(0.0, s.noise_hu, ct.shape)
  ct = np.clip(np.round(ct), *HU_CLIP).astype(np.int16)
  # PET: ~7 mm FWHM resolution, mild multiplicative noise.
  pet_blur = 3.0 / spacing
  pet = ndimage.gaussian_filter(
      pet, (3.0 / z_spacing_mm if z_spacing_mm else 0.0, pet_blur, pet_blur))
  pet = pet * (1 + 0.05 * rng.standard_normal(pet.shape))
  pet = np.clip(pet, 0, None).astype(np.float32)
  return {"ct": ct, "pet": pet, "lesion_mask": mask.astype(np.uint8),
          "tissue": tissue, "lesion_diameter_mm": diameter}


def spacing_mm(image_size: int, *, mode: str, depth: int = 0) -> tuple[float, ...]:
  """Voxel spacing (mm) of a phantom example: (H, W) or (D, H, W)."""
  px = FOV_MM / image_size
  if mode == "3d":
    return ((CHEST_Z_MM[1] - CHEST_Z_MM[0]) / depth, px, px)
  return (px, px)


def subject_examples(seed: Any, *, image_size: int, mode: str, depth: int,
                     slices_per_subject: int) -> list[dict[str, Any]]:
  """All examples of one subject, deterministic given `seed`.

  Args:
    seed: anything np.random.default_rng accepts, e.g. (seed, split, subject).
    image_size: H = W.
    mode: '2d' (slices_per_subject independent axial slices) or '3d' (one
      [depth, H, W] volume spanning CHEST_Z_MM).
    depth: D in 3D mode.
    slices_per_subject: examples per subject in 2D mode.

  Returns:
    Dicts with ct, pet, lesion_mask ([H, W] or [D, H, W]), lesion (int),
    lesion_diameter_mm, age, site, tissue.
  """
  rng = np.random.default_rng(seed)
  anatomy = sample_anatomy(rng)
  age = float(rng.uniform(*AGE_RANGE))
  site = int(rng.integers(0, len(SITES)))
  if mode == "3d":
    z_spacing = (CHEST_Z_MM[1] - CHEST_Z_MM[0]) / depth
    z_mm = CHEST_Z_MM[0] + (np.arange(depth) + 0.5) * z_spacing
    lesion = int(rng.integers(0, len(LESION_CLASSES)))
    ex = render(anatomy, image_size=image_size, z_mm=z_mm, lesion=lesion,
                age=age, site=site, rng=rng, z_spacing_mm=z_spacing)
    ex["lesion_diameter_mm"] = ex["lesion_diameter_mm"][0]
    return [dict(ex, lesion=lesion, age=np.float32(age), site=site)]
  # All slices of a subject in one vectorised call.
  z_mm = np.sort(rng.uniform(60.0, 190.0, slices_per_subject))
  lesions = rng.integers(0, len(LESION_CLASSES), slices_per_subject)
  ex = render(anatomy, image_size=image_size, z_mm=z_mm, lesion=lesions,
              age=age, site=site, rng=rng)
  return [{**{k: v[i] for k, v in ex.items()}, "lesion": int(lesions[i]),
           "age": np.float32(age), "site": site}
          for i in range(slices_per_subject)]
