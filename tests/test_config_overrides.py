"""Every setting is in the config files and can be set from the command line."""
import os

import pytest
from absl import flags
from ml_collections import config_flags

from configs import (common, downstream_lesion, mri_t1flair2t2, phantom_3d, phantom_ct2pet,
                     phantom_gan)
from medgen_jax.eval import reference
from medgen_jax.eval import settings as eval_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(config_arg: str, *overrides: str):
  """The locked config experiments/*.py would get from these command-line flags."""
  argv = ["prog", f"--config={os.path.join(ROOT, config_arg)}", *overrides]
  values = flags.FlagValues()
  # sys_argv: config_flags defines the override flags it finds in the argv.
  config_flags.DEFINE_config_file("config", None, "config", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("get", [
    lambda: phantom_gan.get_config(), lambda: phantom_gan.get_config("quick,cnn"),
    lambda: phantom_3d.get_config("quick"), lambda: phantom_ct2pet.get_config("quick"),
    lambda: mri_t1flair2t2.get_config("quick"),
    lambda: downstream_lesion.get_config("quick").generator_configs.gan])
def test_every_training_config_carries_every_eval_setting(get):
  config = get()
  assert set(config.eval) == set(eval_settings.DEFAULTS)
  eval_settings.eval_settings(config)  # and they are valid


def test_eval_overrides_reach_the_evaluation():
  config = parse("configs/phantom_gan.py:quick", "--config.eval.max_test=5",
                 "--config.eval.num_samples=12", "--config.eval.extractor_widths=(8,16)")
  s = eval_settings.eval_settings(config)
  assert (s["max_test"], s["num_samples"], s["extractor_widths"]) == (5, 12, (8, 16))
  assert s["kid_subsets"] == 3  # the quick variant's value, untouched
  _, test = reference.load_real(config.data, s)
  assert len(test["image"]) == 5


def test_classifier_sections_carry_every_recipe_field_and_take_overrides():
  from medgen_jax import classifier
  from medgen_jax.classifier import recipe as recipe_lib
  from medgen_jax.train import loop
  for config in (phantom_gan.get_config(), phantom_3d.get_config("quick"),
                 phantom_ct2pet.get_config("quick")):
    assert set(config.teacher) == set(recipe_lib.FIELDS)
    assert set(config.selector) == set(recipe_lib.FIELDS) | {"candidates"}
  config = parse("configs/phantom_gan.py:quick", "--config.teacher.steps=9",
                 "--config.teacher.fields=lesion,site", "--config.teacher.max_train=10",
                 "--config.selector.candidates=4", "--config.selector.widths=(8,)")
  assert loop.teacher_recipe(config) == classifier.Recipe(
      steps=9, seed=1, fields=("lesion", "site"), max_train=10)
  assert config.selector.candidates == 4
  assert classifier.from_section(config.selector).widths == (8,)
  with pytest.raises(Exception, match="stpes"):
    parse("configs/phantom_gan.py:quick", "--config.teacher.stpes=9")


def test_a_typo_is_still_an_error():
  with pytest.raises(Exception, match="max_tset"):
    parse("configs/phantom_gan.py:quick", "--config.eval.max_tset=5")


def test_derived_token_grid_follows_the_image_size():
  config = parse("configs/phantom_ct2pet.py:quick", "--config.data.image_size=32")
  assert config.model.token_grid == 32 // config.model.patch_size == 8
  config = parse("configs/phantom_ct2pet.py", "--config.model.patch_size=4")
  assert config.model.token_grid == 64 // 4


def test_variant_parser():
  assert common.parse_variants("quick, attention=axial,cnn", config="x",
                               flags=("quick", "cnn"), values=("attention",)) == (
                                   ["quick", "cnn"], {"attention": "axial"})
  assert common.parse_variants(None, config="x") == ([], {})
  with pytest.raises(ValueError, match=r"x: unknown variant 'quick=1'; use quick, seq=\.\.\."):
    common.parse_variants("quick=1", config="x", flags=("quick",), values=("seq",))
  with pytest.raises(ValueError, match="unknown eval settings"):
    common.eval_section(max_tset=1)
