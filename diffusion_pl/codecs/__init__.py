"""The space the process runs in: pixels, or an autoencoder's latents.

    autoencoder.py       a frozen AutoencoderKL (diffusers) with its scale / shift in one place
"""
