"""The evaluation wing: seeded generation, metrics, the evaluation callbacks and post-hoc EMA.

    generation.py        seeded generation: what grids, `sample` and FID draw
    metrics/             FID / KID / IS: the Inception extractor, statistics, published statistics
    sample_grid.py       SampleGrid: a fixed-seed grid of EMA samples every N steps
    fid_callback.py      FIDCallback: FID of EMA samples during training
    every_n.py           EveryNSteps: the base of both (samplers, guide, the shape to sample)
    ema_sweep.py         the FID sweep of post-hoc EMA lengths, as a table and a plot
"""
