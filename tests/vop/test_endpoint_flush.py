"""A backend that goes back to ``get()`` on an empty ring has published its
completions already: the card sees them without waiting a loop iteration."""

from __future__ import annotations

import asyncio

import pytest

from mic_host.endpoint import EndpointState, QueueEndpoint
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


@pytest.mark.asyncio
@pytest.mark.parametrize("features", [0, int(Feature.EVENT_IDX)])
async def test_batches_serve_a_whole_doorbell_in_one_pass(features: int) -> None:
    """``batches()`` hands over every chain one doorbell made available, in ring
    order, and the whole batch is published with one interrupt; a reset while the
    backend waits does not end the iteration."""
    mem = FlatMemory(1 << 20)
    layout = SplitLayout.contiguous(0, QSIZE)
    driver: DriverQueue[int] = DriverQueue(mem, layout, features)
    dq = DeviceQueue(mem, layout, features)
    dq.activate()
    owner = _Owner()
    ep = QueueEndpoint(owner, 0, QSIZE)
    ep.attach(dq)
    seen: list[int] = []
    served = asyncio.Event()

    async def backend() -> None:
        async for batch in ep.batches():
            seen.append(len(batch))
            for chain in batch:
                ep.put(chain, 0)
            served.set()

    task = asyncio.create_task(backend())
    try:
        await asyncio.sleep(0)  # the backend now waits
        for n in range(10):
            driver.add([(0x8000 + 64 * n, 64)], [], n)
        driver.publish()
        ep.notify()
        await asyncio.wait_for(served.wait(), 10)
        assert seen == [10]
        assert [t for t, _ in driver.get_used_many()] == list(range(10))
        assert owner.interrupts == 1
        assert ep.stats()["chains"] == 10
        assert ep.in_flight == 0
        # across a reset: the iteration goes on with the new ring
        ep.detach(EndpointState.IDLE, "reset")
        await asyncio.sleep(0)
        mem2 = FlatMemory(1 << 20)
        driver2: DriverQueue[int] = DriverQueue(mem2, layout, features)
        dq2 = DeviceQueue(mem2, layout, features)
        dq2.activate()
        ep.attach(dq2)
        served.clear()
        for n in range(3):
            driver2.add([(0x8000, 64)], [], n)
        driver2.publish()
        ep.notify()
        await asyncio.wait_for(served.wait(), 10)
        assert seen == [10, 3]
        assert [t for t, _ in driver2.get_used_many()] == [0, 1, 2]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
