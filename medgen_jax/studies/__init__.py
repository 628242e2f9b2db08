"""Experiments built on trained generators, each reading checkpoints only.

  downstream      the data-augmentation learning curve
  cross_site      a classifier for an unlabelled target site
  classification  the downstream classifier's training, scoring and summary
  sampler_sweep   FD and fidelity against sampler steps and precision
  precision       the fp32 / bf16 / int8 inference table
  probe           how well an extractor architecture reads each condition
  diagnostics     activation spread per condition, D's logits on each split
"""
