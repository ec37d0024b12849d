"""The space the process runs in: pixels, or an autoencoder's latents.

    base.py              Codec (what the module, data checks, generation and commands ask of a space), Pixels
    latent.py            LatentCodec: an Autoencoder's normalized latents; codec_for (a module's codec)
    autoencoder.py       a frozen AutoencoderKL (diffusers) with its scale / shift in one place
"""
