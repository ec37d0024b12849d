"""Sample-quality metrics: FID (Heusel et al. 2017), KID (Binkowski et al. 2018), IS (Salimans et al. 2016).

The protocol that matches published CIFAR-10 numbers (EDM, ADM, torch-fidelity):

    images in [-1, 1] -> uint8: round((x + 1) * 127.5), clamped to [0, 255]
    -> InceptionV3 of the TF FID graph (torch-fidelity's weights), bilinear resize to 299 as TF1
       (no antialiasing) -> 2048 pool features (+ 1008 logits for IS)
    -> FID = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^1/2), 50,000 samples vs 50,000 training images.

The modules of that path:

    inception.py                 the InceptionV3 extractor: weights lookup, download, preflight
    statistics.py                Frechet math, the reference-statistics cache, SampleMetrics
    published.py                 published reference statistics (an npz of mu / sigma)
    pixels.py                    PooledPixels, a weight-free extractor for runs without Inception weights
    ../generation.py             seeded generation, rank split, metric names
    diffusion_pl.data.reference  the reference images of a shard set and their cache key
"""
