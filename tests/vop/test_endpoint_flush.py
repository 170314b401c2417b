"""A backend that goes back to ``get()`` on an empty ring has published its
completions already: the card sees them without waiting a loop iteration."""

from __future__ import annotations

import asyncio

import pytest

from mic_host.endpoint import QueueEndpoint
from virtio.constants import Feature
from virtio.errors import MicError
from virtio.memory import FlatMemory
from virtio.split import DeviceQueue, DriverQueue, SplitLayout

QSIZE = 16


class _Owner:
    def __init__(self) -> None:
        self.interrupts = 0

    def _interrupt(self) -> None:
        self.interrupts += 1

    def _ring_error(self, index: int, exc: MicError) -> None:
        raise AssertionError(f"ring error {exc}")

    def _published(self, index: int, next_avail: int) -> None:
        pass


@pytest.mark.asyncio
@pytest.mark.parametrize("features", [0, int(Feature.EVENT_IDX)])
async def test_completions_are_published_when_the_backend_waits_again(features: int) -> None:
    mem = FlatMemory(1 << 20)
    layout = SplitLayout.contiguous(0, QSIZE)
    driver: DriverQueue[int] = DriverQueue(mem, layout, features)
    dq = DeviceQueue(mem, layout, features)
    dq.activate()
    owner = _Owner()
    ep = QueueEndpoint(owner, 0, QSIZE)
    ep.attach(dq)

    async def backend() -> None:
        async for chain in ep.chains():
            ep.put(chain, 0)  # then straight back to get(): the ring is empty

    task = asyncio.create_task(backend())
    try:
        await asyncio.sleep(0)  # the backend now waits in get()
        for n in range(1, 4):
            driver.add([(0x8000, 64)], [], n)
            driver.publish()
            ep.notify()
            await asyncio.sleep(0)  # one iteration: the backend pops, puts, waits again
            # ... and the used entry is already published (not one iteration later)
            assert driver.get_used_many() == [(n, 0)]
            assert owner.interrupts == n
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
