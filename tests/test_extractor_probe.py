"""The extractor probe scores real test images with the evaluation's own scorer."""
import numpy as np
import pytest

from configs import data_phantom
from medgen_jax.studies import probe


def test_probe_reports_per_class_accuracy_on_the_test_split(tmp_path):
  config = data_phantom.get_config("quick")
  config.data_dir = str(tmp_path)
  out = probe.probe_extractor(config, fields=["lesion", "age"], steps=2, batch_size=4,
                              widths=(4,), feature_dim=4, stem_patch=2)
  assert out["num_test"] > 0 and out["steps"] == 2
  assert out["architecture"]["stem_patch"] == 2
  assert 0.0 <= out["lesion_accuracy"] <= 1.0 and np.isfinite(out["age_mae"])
  assert {f"lesion_accuracy_{c}" for c in ("none", "small", "large")} <= set(out)
  assert "site_accuracy" not in out
  with pytest.raises(ValueError, match="pooling must be one of"):
    probe.probe_extractor(config, steps=1, pooling="attention")
