"""Fixtures of the command tests (the 2-step `run` fit is in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ddim_spec():
    """`ddim_spec(steps=2, eta=0.0, grid=None) -> dict`: DDIM's resolved spec as sample_config.json and the
    evaluate report record it (tests/support/commands.py)."""
    from tests.support.commands import ddim_spec

    return ddim_spec
