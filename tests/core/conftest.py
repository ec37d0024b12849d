"""Fixtures of the core tests: the guidance oracle's pieces (tests/support/guidance.py) for the bodies of
tests/core/test_guidance.py and test_guidance_channels.py (MIX and NULL, constants, are imported)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def conditional_oracle():
    """The class ConditionalOracle(mix, process, prediction): label k is component k, label NULL the mixture."""
    from tests.support.guidance import ConditionalOracle

    return ConditionalOracle


@pytest.fixture(scope="session")
def mixture_noise():
    """`mixture_noise(n, seed=0)`: seeded standard normal noise of n points in 2-D."""
    from tests.support.guidance import mixture_noise

    return mixture_noise


@pytest.fixture(scope="session")
def guidance_module():
    """`guidance_module(process=None, seed=0, resolution=8)`: a tiny class-conditional DiffusionModule, eval mode."""
    from tests.support.guidance import guidance_module

    return guidance_module
