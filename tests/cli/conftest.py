"""Fixtures of the command tests (the 2-step `run` fit is in tests/conftest.py)."""

from __future__ import annotations

import lightning.pytorch  # noqa: F401
import pytest

# Lightning's loggers get their stream handler when Lightning is first imported. `diffusion-pl --help` no longer
# imports it, so without this the first command test to run `fit` would import it inside pytest's output capture,
# and later tests would log into that closed capture stream ("--- Logging error ---").


@pytest.fixture(scope="session")
def ddim_spec():
    """`ddim_spec(steps=2, eta=0.0, grid=None) -> dict`: DDIM's resolved spec as sample_config.json and the
    evaluate report record it (tests/support/commands.py)."""
    from tests.support.commands import ddim_spec

    return ddim_spec
