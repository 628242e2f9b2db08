"""Evaluation metrics for generated medical images.

One job per module:
  features      domain feature extractor (condition classifier, orbax I/O)
  distances     Fréchet distance, KID, chunked nearest neighbours
  manifold      precision / recall / density / coverage (k-NN)
  fidelity      condition fidelity, lesion diameter by thresholding
  physical      per-tissue HU 1-Wasserstein distances, body mask
  paired        PSNR / SSIM / MAE for translation, three-plane 3D
  memorization  nearest-training-neighbour audit and closest-pair figure
  bootstrap     bootstrap confidence intervals
"""
from medgen_jax.eval.bootstrap import bootstrap_ci
from medgen_jax.eval.distances import (frechet_distance,
                                       frechet_distance_from_stats,
                                       kernel_inception_distance,
                                       nearest_neighbors)
from medgen_jax.eval.features import (extract_features, init_extractor,
                                      load_extractor, predict_conditions,
                                      save_extractor, train_feature_extractor)
from medgen_jax.eval.fidelity import (condition_fidelity, lesion_diameter_error,
                                      lesion_diameter_from_image)
from medgen_jax.eval.manifold import prdc
from medgen_jax.eval.memorization import (memorization_audit,
                                          save_closest_pairs_png)
from medgen_jax.eval.paired import paired_metrics
from medgen_jax.eval.physical import body_mask, hu_distribution_distances
