"""Score networks: `net(x, noise_label, class_labels=None) -> tensor shaped like x`.

Every network is a `ScoreNetwork` (base.py), which declares what the framework reads of it:
img_resolution, in_channels, out_channels, num_classes, null_label, augment_dim.

x is (B, C, H, W); noise_label is one float per sample (1000 t, a DDPM step index, or EDM's
c_noise = log(sigma) / 4); class_labels is (B,) int64 or None. A class-conditional network
(num_classes set) has num_classes + 1 label embeddings: index num_classes is the null label
of classifier-free guidance, used when class_labels is None (ADM's table, `UNet(class_null_row=False)`,
has none: its `null_label` is None and it needs labels). Unconditional networks ignore
class_labels. Networks know nothing of processes or losses.

    base.py                           ScoreNetwork: the declared interface
    unet.py, unet_blocks.py, fir.py   the U-Net (DDPM, DDPM++, NCSN++, ADM) and its blocks
    unet_presets.py                   the U-Net presets of the papers, weight for weight
    dit.py                            DiT and its presets (DiT, LightningDiT)
    dit_blocks.py                     DiT's blocks and LightningDiT's block options
    embeddings.py                     noise-label, class-label and position embeddings
    checkpointing.py                  activation checkpointing of the blocks (checkpoint_activations)
    presets.py                        PRESETS: every preset function
"""
