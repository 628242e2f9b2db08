"""Pure metrics of image sets: numpy/jax arrays in, numbers out.

Nothing here trains, samples or reads a config; every function takes arrays
(features, images in physical units, masks) and its settings as arguments.

  distances     Fréchet distance, KID, chunked nearest neighbours
  manifold      precision / recall / density / coverage (k-NN)
  fidelity      condition fidelity, lesion diameter by thresholding
  physical      per-tissue HU 1-Wasserstein distances, body mask
  paired        PSNR / SSIM / MAE for translation, three-plane 3D
  memorization  nearest-training-neighbour audit and closest-pair figure
  bootstrap     bootstrap confidence intervals
"""
from medgen_jax.metrics.bootstrap import bootstrap_ci
from medgen_jax.metrics.distances import (frechet_distance, frechet_distance_from_stats,
                                          kernel_inception_distance, nearest_neighbors)
from medgen_jax.metrics.fidelity import (condition_fidelity, lesion_diameter_error,
                                         lesion_diameter_from_image)
from medgen_jax.metrics.manifold import prdc
from medgen_jax.metrics.memorization import memorization_audit, save_closest_pairs_png
from medgen_jax.metrics.paired import paired_metrics
from medgen_jax.metrics.physical import body_mask, hu_distribution_distances
