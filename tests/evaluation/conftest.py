"""Fixtures of the evaluation tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def eval_callbacks():
    """`eval_callbacks(extractor=None) -> (fid, grid)`: the recording FID + grid callbacks of the callback tests,
    the same in-process and under DDP (tests/support/evaluation.py `make_callbacks`)."""
    from tests.support.evaluation import make_callbacks

    return make_callbacks
