"""configs/mri_t1flair2t2.py: two MRI sources -> T2 on a medical_folder dataset."""
import numpy as np
import pytest

from configs import mri_t1flair2t2
from conftest import write_nifti
from medgen_jax import data, models
from medgen_jax.train import translation


def _mri_folder(root, subjects=4):
  """Paired t1 / flair / t2 volumes per subject: one grid, different contrasts."""
  rng = np.random.default_rng(0)
  for i in range(subjects):
    d = root / f"subject{i}"
    d.mkdir(parents=True)
    brain = np.zeros((6, 20, 24), np.float32)
    brain[:, 4:-4, 4:-4] = 1.0
    lesion = np.zeros_like(brain)
    lesion[:, 8:11, 9:13] = 1.0
    noise = lambda: rng.normal(0, 0.02, brain.shape)  # noqa: E731
    write_nifti(d / "t1.nii.gz", 300 * brain - 100 * lesion + 5 * noise())
    write_nifti(d / "flair.nii.gz", 200 * brain + 300 * lesion + 5 * noise())
    write_nifti(d / "t2.nii.gz", 150 * brain + 250 * lesion + 5 * noise())


def _config(tmp_path, variant="quick"):
  _mri_folder(tmp_path / "mri")
  config = mri_t1flair2t2.get_config(variant)
  config.data.source_dir = str(tmp_path / "mri")
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.split_fractions = (0.5, 0.25, 0.25)
  config.data.foreground_only = False
  return config


@pytest.mark.parametrize("variant, generator", [("quick", "translator"),
                                                ("quick,unet", "unet")])
def test_two_sources_build_a_translator_for_t2(tmp_path, variant, generator):
  config = _config(tmp_path, variant)
  data.build(config.data)
  info = data.load_info(config.data)
  assert info.modalities == ("t1", "flair", "t2") and info.conditions == ()
  translation.validate_translation_config(config, info)
  assert translation.source_target_names(config.model, info) == (
      ("t1", "flair"), ("t2",))
  g = models.build_generator(config.model, info)
  assert g.source_modalities == ("t1", "flair") and config.model.generator == generator
  assert config.model.modality_dropout == 0.3


def test_unknown_variant_is_one_clear_error():
  with pytest.raises(ValueError, match="unknown variant 'pet'"):
    mri_t1flair2t2.get_config("pet")


@pytest.mark.slow
def test_quick_trains_two_steps(tmp_path):
  from medgen_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  config = _config(tmp_path)
  summary = train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["steps"] == 2 and np.isfinite(summary["last_metrics"]["recon_l1"])
