"""Fixtures: one framework per module (real worker processes), helpers for direct rings."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from mic_card.accel import AccelFramework, DeviceSpec, default_devices
from transport import NotifyMode, NotifyPolicy

#: tests sleep on eventfds (hybrid with a short spin): no busy polling on a shared 2-core box
APP_POLICY = NotifyPolicy(NotifyMode.HYBRID, spin_ns=5_000)
WORKER_POLICY = NotifyPolicy(NotifyMode.HYBRID, spin_ns=5_000)


def framework(devices: tuple[DeviceSpec, ...] | None = None, **kw: object) -> AccelFramework:
    return AccelFramework(
        devices or default_devices(workers=1, max_queues=4),
        policy=APP_POLICY,
        worker_policy=WORKER_POLICY,
        **kw,  # type: ignore[arg-type]
    )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def fw() -> AsyncIterator[AccelFramework]:
    devs = (
        *default_devices(workers=1, max_queues=4),
        DeviceSpec("mic-zip-nosva", ("deflate", "zlib", "gzip"), workers=1, sva=False, node=1),
    )
    async with framework(devs) as f:
        yield f
