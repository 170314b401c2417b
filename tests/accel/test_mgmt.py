"""The management queue: layouts, requests on the control ring, events on the event ring."""

from __future__ import annotations

import asyncio

import pytest

from mic_card.accel import AccelFramework, Request
from mic_card.accel.mgmt import (
    CAPS_STRUCT,
    CTRL_SLOTS,
    DEV_STATS_STRUCT,
    EVENT_RING,
    EVENT_STRUCT,
    MGMT_REQ_STRUCT,
    MGMT_RESP_STRUCT,
    QSTATS_STRUCT,
    Caps,
    DevStats,
    Event,
    FaultEvent,
    MgmtOp,
    MgmtReq,
    MgmtRespHeader,
    MgmtStatus,
    QueueStatsEntry,
)
from mic_card.accel.wire import Op
from virtio.errors import WouldBlock

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.mark.parametrize(
    ("decl", "twin", "size"),
    [
        (MgmtReq, MGMT_REQ_STRUCT, 16),
        (MgmtRespHeader, MGMT_RESP_STRUCT, 8),
        (Caps, CAPS_STRUCT, 48),
        (DevStats, DEV_STATS_STRUCT, 16),
        (QueueStatsEntry, QSTATS_STRUCT, 72),
        (Event, EVENT_STRUCT, 64),
    ],
)
async def test_layouts_match_their_struct_twins(decl, twin, size) -> None:  # type: ignore[no-untyped-def]
    assert decl.sizeof() == twin.size == size
    golden = bytes(range(size))
    parsed = decl.parse(golden) if decl is not MgmtReq else None
    if parsed is not None:
        values = [v for k, v in parsed.items() if not k.startswith("_")]
        assert decl.build(parsed) == twin.pack(*twin.unpack(golden))
        assert list(twin.unpack(golden)) == values
    req = MgmtReq.build({"op": 2, "qid": 7, "tag": 9})
    assert MGMT_REQ_STRUCT.unpack(req) == (1, 2, 7, 9)


async def test_requests_go_through_the_control_ring(fw: AccelFramework) -> None:
    dev = fw.device("mic-sec")
    mgmt = dev.mgmt
    ring = mgmt._ctrl
    before = ring._shadow
    caps = mgmt.capabilities()
    assert caps["api"] == "mic-accel-v2"
    assert caps["algorithms"][:2] == ["aes-cbc", "aes-ctr"]
    assert ring._shadow == (before + 1) & 0xFFFF  # one chain, answered by the unit
    async with dev.queue() as q:
        q.submit(Request(Op.NOP))
        assert (await q.recv()).ok
        stats = mgmt.stats()
        assert stats["queues"][q.qid]["requests"] == 1
        assert stats["queues"][q.qid]["submitted"] == 1
        await mgmt.reset_queue(q.qid)  # asynchronous: answered when the reset is done
        q.submit(Request(Op.NOP))
        assert (await q.recv()).ok
    with pytest.raises(KeyError):
        await mgmt.reset_queue(9999)
    # a request the unit does not know is answered, and the ring stays usable
    slot = mgmt._submit(MgmtOp.CAPABILITIES)
    mgmt._view[mgmt.geometry.req(slot) + 1] = 99  # scribble the op
    mgmt.unit.serve()
    mgmt._reap()
    assert mgmt._done.pop(slot)[0] is MgmtStatus.BAD_REQUEST
    assert mgmt.stats()["isolate"] is False
    # many requests in flight at once, then all answered
    slots = [mgmt._submit(MgmtOp.STATS) for _ in range(CTRL_SLOTS)]
    with pytest.raises(WouldBlock, match="in flight"):
        mgmt._submit(MgmtOp.STATS)
    mgmt.unit.serve()
    mgmt._reap()
    assert all(mgmt._done.pop(s)[0] is MgmtStatus.OK for s in slots)


async def test_fault_events_use_the_event_ring_and_drop_when_it_is_empty(
    fw: AccelFramework,
) -> None:
    dev = fw.device("mic-zip")
    mgmt = dev.mgmt
    async with mgmt.faults() as events:
        dropped = mgmt.stats()["dropped_events"]
        for i in range(EVENT_RING + 6):  # the driver reaps only when its task runs
            mgmt.unit.post_event(FaultEvent(dev.name, i, "access", f"test {i}"))
        assert mgmt.stats()["dropped_events"] == dropped + 6
        got = [await asyncio.wait_for(events.get(), 5) for _ in range(EVENT_RING)]
        assert [e.qid for e in got] == list(range(EVENT_RING))
        assert got[3].detail == "test 3"
        assert got[3].kind == "access"
        # buffers were given back: a later fault is delivered again
        dev.record_fault("ring", 5, "after the burst")
        ev = await asyncio.wait_for(events.get(), 5)
        assert (ev.kind, ev.qid, ev.detail) == ("ring", 5, "after the burst")
    mgmt.clear_isolation()
    assert dev.fault_count() == 0
