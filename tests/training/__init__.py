"""Tests of diffusion_pl/training: DiffusionModule, EMA and post-hoc EMA, augmentation, latent training, DDP and
multi-node runs, fine-tuning."""
