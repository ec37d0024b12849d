"""Fixtures of the data tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sample_ids():
    """`sample_ids(images) -> list[int]`: the ids of constant-colour test images, id = 256 * red + green
    (tests/support/data.py; make_id_shards in tests/data/test_data.py writes them)."""
    from tests.support.data import sample_ids

    return sample_ids
