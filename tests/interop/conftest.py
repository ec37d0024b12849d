"""Fixtures of the interop tests (the reference models themselves are in tests/support/interop.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def our_sinusoid():
    """The class OurSinusoid(unet): our UNet's timestep sinusoid in diffusers' `time_proj` slot."""
    from tests.support.interop import OurSinusoid

    return OurSinusoid


@pytest.fixture(scope="session")
def dit_reference_model():
    """`dit_reference_model(num_layers=2, norm_eps=1e-5)`: a randomised DiTTransformer2DModel of the DIT config."""
    from tests.support.interop import dit_reference_model

    return dit_reference_model
