"""Fixtures of the core tests: the guidance oracle's pieces (tests/support/guidance.py) for the bodies of
tests/core/test_guidance.py and test_guidance_channels.py (MIX and NULL, constants, are imported)."""

from __future__ import annotations

import pytest

import diffusion_pl.processes
import diffusion_pl.sampling
from diffusion_pl.utils.classes import import_submodules

# The core tests parametrize over every public subclass (Process, Sampler, TimeGrid, ...), and a class is known only
# once its module is imported: import them all before the test files are collected, so a file run alone sees them.
for _package in (diffusion_pl.processes, diffusion_pl.sampling):
    import_submodules(_package)


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
