"""Data layer: TFDS builders (ct_phantom, medical_folder, medmnist) + grain.

Public API (docs/architecture.md):
  load_dataset(data_config, *, split, batch_size, seed, ...) -> (iterator, info)
  load_info(data_config) -> DatasetInfo
  load_arrays(data_config, *, split, max_examples=None) -> dict of arrays
  render_fresh_arrays(data_config, *, num_subjects) -> dict of arrays (ct_phantom)
  build(data_config) -> summary dict (what experiments/build_dataset.py runs)
"""
from medgen_jax.data.builders import build, condition_names, validate
from medgen_jax.data.info import (CATEGORICAL, CONTINUOUS, ConditionField, DatasetInfo,
                                  IntensityTransform, condition_dict,
                                  uniform_conditions)
from medgen_jax.data.pipeline import (load_arrays, load_dataset, load_info,
                                      render_fresh_arrays)

__all__ = [
    "build", "condition_names", "validate", "load_arrays", "load_dataset", "load_info",
    "render_fresh_arrays",
    "CATEGORICAL", "CONTINUOUS", "ConditionField", "DatasetInfo",
    "IntensityTransform", "condition_dict", "uniform_conditions",
]
