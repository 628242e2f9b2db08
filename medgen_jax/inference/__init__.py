"""Inference: sampling to NIfTI, fp32/bf16/int8 generators, attention maps.

  sample          `sample(config, workdir, ...)`, `generator_fn` (for eval)
  quantize        `prepare(generator, params, precision)`, `prepare_for_sampling`
  attention_maps  per-layer attention from one query, rollout, condition-gate map
  nifti           `save_nifti` with voxel spacing
"""
