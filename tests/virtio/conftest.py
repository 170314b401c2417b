"""Fixtures for the ring-core tests: a driver/device pair per feature set and size."""

from __future__ import annotations

import pytest

from tests.virtio.pair import RingPair

FEATURE_SETS = [
    pytest.param((False, False), id="plain"),
    pytest.param((True, False), id="event_idx"),
    pytest.param((False, True), id="indirect"),
    pytest.param((True, True), id="event_idx+indirect"),
]


@pytest.fixture(params=FEATURE_SETS)
def flags(request: pytest.FixtureRequest) -> tuple[bool, bool]:
    """(event_idx, indirect)."""
    return request.param


@pytest.fixture(params=[2, 4, 16])
def size(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture
def pair(flags: tuple[bool, bool], size: int) -> RingPair:
    event_idx, indirect = flags
    return RingPair(size, event_idx=event_idx, indirect=indirect)
