"""Sample-quality metrics: FID (Heusel et al. 2017), KID (Binkowski et al. 2018), IS (Salimans et al. 2016).

The protocol that matches published CIFAR-10 numbers (EDM, ADM, torch-fidelity):

    images in [-1, 1] -> uint8: round((x + 1) * 127.5), clamped to [0, 255]
    -> InceptionV3 of the TF FID graph (torch-fidelity's weights), bilinear resize to 299 as TF1
       (no antialiasing) -> 2048 pool features (+ 1008 logits for IS)
    -> FID = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^1/2), 50,000 samples vs 50,000 training images.

This package gathers the names of that path in one place:

    diffusion_pl.metrics.inception    the InceptionV3 extractor: weights lookup, download, preflight
    diffusion_pl.metrics.statistics   Frechet math, the reference-statistics cache, SampleMetrics
    diffusion_pl.generation           seeded generation, to_uint8, rank split, metric names
    diffusion_pl.data.reference       the reference images of a shard set and their cache key
"""

from diffusion_pl.data.reference import reference_images
from diffusion_pl.generation import (class_labels_for, generate, metric_prefix, rank_indices, rank_world,
                                     sampler_label, to_uint8)
from diffusion_pl.metrics.inception import (WEIGHTS_ENV, InceptionFeatures, InceptionWeightsError,
                                            inception_weights_file, load_inception, random_inception_weights)
from diffusion_pl.metrics.statistics import (PROTOCOL, ReferenceStats, SampleMetrics, extract, fingerprint,
                                             frechet_distance, gaussian_stats, reference_stats)

# outside __all__, yet importable as before (metrics.INCEPTION_URL in the tests)
from diffusion_pl.generation import FULL_PROTOCOL_SAMPLES as FULL_PROTOCOL_SAMPLES
from diffusion_pl.metrics.inception import INCEPTION_URL as INCEPTION_URL

__all__ = [
    "PROTOCOL", "WEIGHTS_ENV", "InceptionWeightsError", "InceptionFeatures", "ReferenceStats", "SampleMetrics",
    "to_uint8", "extract", "load_inception", "inception_weights_file", "random_inception_weights", "fingerprint",
    "reference_images", "reference_stats", "frechet_distance", "gaussian_stats", "metric_prefix", "sampler_label",
    "class_labels_for", "generate", "rank_world", "rank_indices",
]
