"""The evaluation wing: seeded generation, metrics, evaluation as functions, the callbacks and post-hoc EMA.

    generation.py        seeded generation: what grids, `sample` and FID draw
    metrics/             FID / KID / IS: the Inception extractor, statistics, published statistics
    evaluate.py          evaluate / evaluate_checkpoints (EvalOptions): FID, KID, IS, bits/dim of a checkpoint
    report.py            EvalReport: what evaluate returns and `diffusion-pl evaluate` writes as .eval.json
    loading.py           a checkpoint's module, its guide, the shape it generates, the device launch
    samples.py           sample folders / .npz files on disk
    bits_per_dim.py      bits/dim of a data set, split over ranks
    reconstruct.py       reconstruct: post-hoc EMA checkpoints from PowerEMA snapshots (ReconstructReport)
    ema_sweep.py         the FID sweep of post-hoc EMA lengths, as a table and a plot
    sample_grid.py       SampleGrid: a fixed-seed grid of EMA samples every N steps
    image_logging.py     log_image: a grid to every logger that takes images (TensorBoard, W&B, MLflow, Comet)
    fid_callback.py      FIDCallback: FID of EMA samples during training
    every_n.py           EveryNSteps: the base of both (samplers, guide, the shape to sample)
"""
