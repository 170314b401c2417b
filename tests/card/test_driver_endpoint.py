"""The card's DriverEndpoint keeps its outstanding requests in a completion table
(future -> release): answered requests resolve their future and keep their
buffers; cancelled ones are released exactly once, when the host answers;
``fail`` releases and fails every one still outstanding."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from mic_card.endpoint import DriverEndpoint
from virtio.errors import BrokenResourceError
from virtio.memory import FlatMemory
from virtio.split import DeviceQueue, DriverQueue, SplitLayout

QSIZE = 16


def _pair() -> tuple[DriverEndpoint, DeviceQueue, list[int]]:
    mem = FlatMemory(1 << 20)
    layout = SplitLayout.contiguous(0, QSIZE)
    driver: DriverQueue[asyncio.Future[int]] = DriverQueue(mem, layout, 0)
    dq = DeviceQueue(mem, layout, 0)
    dq.activate()
    kicks: list[int] = []
    return DriverEndpoint(driver, lambda: kicks.append(1), 0), dq, kicks


def _answer_all(dq: DeviceQueue, n: int) -> None:
    for chain in dq.pop_many():
        dq.add_used(chain.head, n)
    dq.publish_used()


@pytest.mark.asyncio
async def test_answered_cancelled_and_failed_requests() -> None:
    ep, dq, kicks = _pair()
    released: Counter[int] = Counter()

    def rel(i: int) -> None:
        released[i] += 1

    futs = [
        ep.submit_nowait([(0x8000 + 64 * i, 16)], [(0x9000 + 64 * i, 8)], lambda i=i: rel(i))
        for i in range(6)
    ]
    assert ep.outstanding == 6
    await asyncio.sleep(0)  # published, one kick
    assert kicks == [1]
    futs[1].cancel()
    futs[4].cancel()
    _answer_all(dq, 8)
    ep.on_interrupt()
    assert [f.result() for i, f in enumerate(futs) if i not in (1, 4)] == [8] * 4
    assert released == Counter({1: 1, 4: 1})  # only the cancelled ones, once each
    assert ep.outstanding == 0
    assert ep.stats()["completed"] == 6

    more = [ep.submit_nowait([(0x8000, 16)], [], lambda i=i: rel(10 + i)) for i in range(3)]
    ep.fail(BrokenResourceError("device removed"))
    ep.fail(BrokenResourceError("again"))  # idempotent: nothing released twice
    assert released == Counter({1: 1, 4: 1, 10: 1, 11: 1, 12: 1})
    for f in more:
        with pytest.raises(BrokenResourceError, match="device removed"):
            f.result()
    assert ep.outstanding == 0
    with pytest.raises(BrokenResourceError):
        ep.submit_nowait([(0x8000, 16)], [], None)
