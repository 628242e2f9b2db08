"""Evaluation metrics for generated medical images.

One job per module:
  evaluate      `evaluate(config, workdir)`: the end-to-end run, task dispatch
  settings      `config.eval` keys, defaults and checks
  reference     the real splits and the conditions drawn from them
  scoring       `evaluate_images`: every metric of one set and its real reference
  output        metrics.json
  baseline      a baseline run's generator config, rebuilt from its config.json
  report        figures
  translation   paired translation metrics in physical units
  precision     the fp32 / bf16 / int8 inference table
  downstream    the data-augmentation experiment
  probe         how well an extractor architecture reads each condition
  distances     Fréchet distance, KID, chunked nearest neighbours
  manifold      precision / recall / density / coverage (k-NN)
  fidelity      condition fidelity, lesion diameter by thresholding
  physical      per-tissue HU 1-Wasserstein distances, body mask
  paired        PSNR / SSIM / MAE for translation, three-plane 3D
  memorization  nearest-training-neighbour audit and closest-pair figure
  bootstrap     bootstrap confidence intervals

The domain feature extractor is a `medgen_jax.classifier` network, trained
and cached from the `config.eval.extractor_*` recipe (`settings`).
"""
from medgen_jax.eval.bootstrap import bootstrap_ci
from medgen_jax.eval.distances import (frechet_distance,
                                       frechet_distance_from_stats,
                                       kernel_inception_distance,
                                       nearest_neighbors)
from medgen_jax.eval.fidelity import (condition_fidelity, lesion_diameter_error,
                                      lesion_diameter_from_image)
from medgen_jax.eval.manifold import prdc
from medgen_jax.eval.memorization import (memorization_audit,
                                          save_closest_pairs_png)
from medgen_jax.eval.paired import paired_metrics
from medgen_jax.eval.physical import body_mask, hu_distribution_distances
