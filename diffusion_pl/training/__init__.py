"""The training wing: the LightningModule, its EMA, augmentation, and the callbacks of a training run.

    module.py            DiffusionModule: images -> codec -> t, eps -> x_t -> network -> wrapper -> loss
    ema.py               EMA: the averaged network's update rule and the run's images-seen counter
    shapes.py            the network's declared shapes against the data's and a guide's; the fit-time fill
    augment.py           EDM's non-leaking augmentation
    schedules.py         learning-rate schedules: warm-up + constant, cosine, EDM2's inverse square root
    phema.py             power-function EMA profiles and their post-hoc reconstruction math
    sharding.py          sharded training (FSDP): the networks' auto-wrap policy, sharded gradient norms
    callbacks/           checkpointing, the power-function EMA, the base of step callbacks
"""
