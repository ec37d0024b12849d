"""Data layer: webdataset shards written by ``diffusion-pl prepare``, streamed by ShardDataModule.

- ``prepare`` (``writer``): CIFAR-10 (torchvision or local python batches) and image folders / tars
  (``sources``) -> reproducible tar shards + manifest.json (``write_shards`` is the writer itself);
  ``diffusion_pl.data.prepare`` keeps these names importable where they were.
- ``ShardDataModule`` (``datamodule``): batches (images float32 (B, C, H, W) in [-1, 1], labels int64
  (B,)), split over ranks and workers, infinite for training and exactly resumable: shard lists and
  tar reading in ``shards``, the sampling order in ``order``, the stream itself in ``stream``.
- ``builtin``: the seeded coloured-shapes dataset behind ``shards="builtin:shapes"``.
- ``crop``: ADM's centre crop (``prepare folder --center_crop N``); ``latents``: latent shards
  (``prepare --encode VAE``: the frozen autoencoder's raw posterior mean and std, float16, of each image
  and of its mirror image), which ShardDataModule streams as (B, 2 C, h, w) batches.
"""
