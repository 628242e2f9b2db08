"""Shared tiny models, writers of tiny source files, and fixtures of the suite.

Test modules import the helpers directly (`from conftest import TinyG, ...`);
the tests directory is on sys.path under pytest and in the subprocess scripts
(they add it themselves).

Compilation: XLA's CPU backend compiles at LLVM optimisation level 0 here.
The tests check values, shapes, shardings and the compiled HLO, not the speed
of the generated machine code, and most of the suite's time is compiling tiny
models: level 0 cuts that by roughly 40 %. A level already set in XLA_FLAGS
wins, and the subprocess scripts inherit the flag through the environment.
"""
import functools
import math
import os

_OPT_FLAG = "--xla_backend_optimization_level"
if _OPT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_OPT_FLAG}=0".strip()

# pylint: disable=wrong-import-position
import flax.linen as nn  # noqa: E402
import grain  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from configs import phantom_gan  # noqa: E402
from medgen_jax import data as data_lib, models  # noqa: E402
from medgen_jax.data.info import ConditionField, DatasetInfo, IntensityTransform  # noqa: E402
from medgen_jax.train import checkpoint as ckpt_lib, flow as flow_lib, state as state_lib, step as step_lib  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)


# ---- tiny GAN: stand-in networks with the models interface ----
# G(z, conditions, *, train) and D(images, conditions, *, train), 8x8 images.

INFO = DatasetInfo(
    name="synthetic", image_shape=(8, 8, 1), modalities=("ct",),
    intensity=(IntensityTransform("ct", "HU", -1000.0, 1000.0),),
    conditions=(ConditionField("lesion", "categorical", 3, ("none", "small", "large")),))


class TinyG(nn.Module):
  shape: tuple = INFO.image_shape

  @nn.compact
  def __call__(self, z, conditions, *, train):
    h = nn.Dense(16)(z) + nn.Embed(3, 16)(jnp.maximum(conditions["lesion"], 0))
    x = nn.Dense(math.prod(self.shape))(nn.relu(h))
    return jnp.tanh(x).reshape((-1,) + tuple(self.shape))


class TinyD(nn.Module):
  spectral_norm: bool = True

  @nn.compact
  def __call__(self, images, conditions, *, train):
    h = nn.Dense(8)(images.reshape(images.shape[0], -1))
    if self.spectral_norm:
      h = nn.SpectralNorm(nn.Dense(8))(h, update_stats=train)
    h = nn.leaky_relu(h, 0.2)
    proj = nn.Embed(3, 8)(jnp.maximum(conditions["lesion"], 0))
    return nn.Dense(1)(h)[:, 0] + jnp.sum(proj * h, axis=-1)


def tiny_config(**loss_overrides):
  loss = dict(gan="nonsaturating", r1_gamma=1.0, r2_gamma=0.0, r1_every=2,
              augment="translation,cutout,intensity", ema_decay=0.9, condition_weight=0.0,
              diversity_weight=0.0, teacher_weight=0.0, teacher_margin="none")
  loss.update(loss_overrides)
  return ml_collections.ConfigDict(dict(
      task="generation", model=dict(latent_dim=4),
      train=dict(num_steps=10, batch_size=8, seed=0),
      optim=dict(g_lr=1e-3, d_lr=2e-3, b1=0.0, b2=0.99, schedule="constant",
                 warmup_steps=0, grad_clip=1.0),
      loss=loss,
      parallel=dict(mode="jit", mesh=dict(data=-1, seq=1),
                    logical_axis_rules=(("batch", "data"),))))


def tiny_batch(i, batch_size=8):
  rng = np.random.default_rng(i)
  return {"image": rng.uniform(-1, 1, (batch_size, 8, 8, 1)).astype(np.float32),
          "lesion": rng.integers(0, 3, batch_size).astype(np.int32)}


def step_noise(state, step=0, batch_size=8, latent_dim=4):
  """The latent noise (z for D's update, z for G's) of the step's documented
  RNG layout: keys = split(fold_in(state.rng, step), 8), z from keys[0:2]."""
  keys = jax.random.split(jax.random.fold_in(state.rng, step), 8)
  return tuple(jax.random.normal(k, (batch_size, latent_dim)) for k in keys[:2])


def make_tiny_step(config, spectral_norm=True):
  """(models, initial state, jitted train step) of TinyG / TinyD under `config`."""
  models = state_lib.make_models(TinyG(), TinyD(spectral_norm=spectral_norm), config)
  hooks = step_lib.trainer_hooks(config, models, INFO)
  return models, hooks["init_fn"](), jax.jit(functools.partial(hooks["step_fn"], models=models))


def flow_shapes(g, info, n):
  """(variables, velocity, sampled images) of FlowGenerator `g` as shapes, for
  `n` dummy requests: the velocity call at t = 1 and the sampler's call."""
  cond = state_lib.dummy_conditions(info, n)
  x = jnp.zeros((n,) + info.image_shape)
  variables = jax.eval_shape(lambda: g.init(jax.random.PRNGKey(0), x, jnp.ones(n), cond,
                                            train=False, method="velocity"))
  v = jax.eval_shape(lambda p: g.apply(p, x, jnp.ones(n), cond, train=False,
                                       method="velocity"), variables)
  images = jax.eval_shape(lambda p: g.apply(p, jnp.zeros((n, g.latent_dim)), cond,
                                            train=False), variables)
  return variables, v, images


def tiny_examples(n=24, nan_at=None):
  """In-memory examples in the data layer's format ('image' [8, 8, 1], 'lesion')."""
  rng = np.random.default_rng(0)
  out = [{"image": rng.uniform(-1, 1, (8, 8, 1)).astype(np.float32),
          "lesion": np.int32(rng.integers(0, 3))} for _ in range(n)]
  if nan_at is not None:
    out[nan_at]["image"][:] = np.nan
  return out


def tiny_iterator(batch_size=8, shuffle=True, **kwargs):
  """A checkpointable grain iterator over tiny_examples (like load_dataset's)."""
  ds = grain.MapDataset.source(tiny_examples(**kwargs))
  if shuffle:
    ds = ds.shuffle(seed=0)
  return iter(ds.repeat().batch(batch_size, drop_remainder=True))


def tiny_loop_config(**train_overrides):
  """tiny_config plus the loop's train fields."""
  config = tiny_config()
  config.train.update(dict(num_steps=6, log_every=1, sample_every=100, checkpoint_every=1,
                           keep_checkpoints=10))
  config.train.update(train_overrides)
  return config


@pytest.fixture(scope="session")
def tiny_step():
  """make_tiny_step(tiny_config()): the default tiny step, compiled once."""
  return make_tiny_step(tiny_config())


@pytest.fixture(scope="session")
def plain_tiny_step():
  """The tiny step without augmentation, R1 or spectral norm, compiled once."""
  return make_tiny_step(tiny_config(augment="", r1_gamma=0.0), spectral_norm=False)


# ---- checkpoints in the training loop's layout ----

def perturbed(params, scale=0.3, seed=0):
  """Every parameter plus host-side noise, so zero-initialised heads and gates act."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + scale * rng.normal(size=p.shape).astype(p.dtype), params)


def random_generator_params(generator, info, latent_dim, batch_size, *, scale=0.1, seed=0):
  """Generator params drawn N(0, scale) (gates and heads included, so every
  branch is active): a stand-in for trained weights in precision tests."""
  abstract = jax.eval_shape(lambda: generator.init(
      jax.random.PRNGKey(0), jnp.zeros((batch_size, latent_dim)),
      state_lib.dummy_conditions(info, batch_size), train=False))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, scale, a.shape), a.dtype),
                      abstract)


def write_checkpoint(config, workdir, *, step=3, seed=0):
  """The task's state (TrainState, or FlowState for flow configs) with random
  (non-zero, gates included) params, saved like the loop does."""
  info = data_lib.load_info(config.data)
  g = models.build_generator(config.model, info)
  if config.get("task") == "flow":
    init = flow_lib.make_init_fn(state_lib.make_models(g, None, config), info, config)
  else:
    d = models.build_discriminator(config.model, info)
    init = state_lib.make_init_fn(state_lib.make_models(g, d, config), info,
                                  latent_dim=config.model.latent_dim, seed=seed)
  abstract = jax.eval_shape(init)
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.1, a.shape).astype(a.dtype)),
                       abstract)
  manager = ckpt_lib.make_manager(os.path.join(workdir, "checkpoints"), keep=3)
  ckpt_lib.save(manager, step, state, {})
  manager.close()
  return state


@pytest.fixture(scope="session")
def quick_checkpoint(tmp_path_factory):
  """(config, workdir, state): write_checkpoint of configs/phantom_gan.py:quick."""
  config = phantom_gan.get_config("quick")
  workdir = str(tmp_path_factory.mktemp("quick_checkpoint"))
  return config, workdir, write_checkpoint(config, workdir)


# ---- tiny medical source files (NIfTI, DICOM) ----

IDENTIFIERS = {"PatientName": "Doe^Jane", "PatientID": "MRN7781234",
               "PatientBirthDate": "19510314", "AccessionNumber": "ACC99812",
               "InstitutionName": "St Elsewhere Hospital",
               "ReferringPhysicianName": "House^Gregory", "StudyID": "STUDY4471"}


def write_nifti(path, zyx: np.ndarray, spacing=(2.0, 1.0, 1.0)):
  """Writes a [Z, H, W] array (our reader's convention) as RAS NIfTI."""
  xyz = np.transpose(zyx[:, ::-1, ::-1], (2, 1, 0))
  affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
  nib.save(nib.Nifti1Image(xyz.astype(np.float32), affine), str(path))


def write_dicom_series(folder, hu: np.ndarray, *, slope=1.0, intercept=-1024.0,
                       tags=None, shuffle_names=True):
  """Writes [Z, H, W] HU as one DICOM file per slice (file order scrambled)."""
  os.makedirs(folder, exist_ok=True)
  z = hu.shape[0]
  order = np.random.default_rng(0).permutation(z) if shuffle_names else range(z)
  for file_index, k in enumerate(order):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = os.path.join(folder, f"IM{file_index:04d}.dcm")
    ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in (tags or {}).items():
      setattr(ds, key, value)
    ds.Modality = "CT"
    ds.Rows, ds.Columns = hu.shape[1:]
    ds.PixelSpacing = [0.8, 0.8]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, 2.5 * float(k)]
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    stored = np.round((hu[k] - intercept) / slope).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def ct_volume(seed, shape=(6, 20, 24)):
  """A body-like block: -1000 HU air around a 40 HU box with a 600 HU core."""
  rng = np.random.default_rng(seed)
  v = np.full(shape, -1000.0, np.float32)
  v[:, 4:-4, 4:-4] = 40.0
  v[:, 8:12, 10:14] = 600.0
  return v + rng.integers(-3, 4, shape)
