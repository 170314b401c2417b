"""Fixtures: a host+card rig, temp images."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.vop.rig import Rig


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 1 MiB image whose sector n starts with b'sector n'."""
    p = tmp_path / "disk.img"
    data = bytearray(1 << 20)
    for n in range(len(data) // 512):
        tag = f"sector {n}".encode()
        data[n * 512 : n * 512 + len(tag)] = tag
    p.write_bytes(bytes(data))
    return p


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig(config_timeout=2.0, remove_timeout=2.0, drain_timeout=2.0)
    try:
        yield r
    finally:
        await r.aclose()
