"""Engine faults: crash, hang, ring errors; recovery by reset; isolation; nothing else harmed."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from mic_card.accel import (
    AccelFramework,
    DeviceIsolated,
    DeviceSpec,
    QueueDisabled,
    Request,
    Session,
    SessionSpec,
    Status,
)
from mic_card.accel.wire import Op
from virtio.split import DESC

from .conftest import framework

pytestmark = pytest.mark.asyncio(loop_scope="module")
CRASH, HANG = 1, 2


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def ffw() -> AsyncIterator[AccelFramework]:
    devs = (
        DeviceSpec("bad-zip", ("zlib",), workers=1, max_queues=4, allow_inject=True,
                   isolate_strategy=3),
        DeviceSpec("good-sec", ("sha256",), workers=1, max_queues=2),
    )  # fmt: skip
    async with framework(devs, hang_timeout=0.3, watchdog_interval=0.05) as f:
        yield f


async def _roundtrip(s: Session) -> None:
    assert bytes(await s.do(b"ok" * 100)) == hashlib.sha256(b"ok" * 100).digest()


async def test_crash_fails_in_flight_and_reset_recovers(ffw: AccelFramework) -> None:
    dev = ffw.device("bad-zip")
    good = Session([await _started(ffw, "good-sec")], SessionSpec("sha256"))
    async with dev.mgmt.faults() as events, dev.queue() as q:
        s = Session([q], SessionSpec("zlib"))
        pid = dev.worker_of(q)
        # a normal request queued behind the crash is failed, not lost
        q.submit_many([(Request(Op.INJECT, CRASH), "boom"), (Request(Op.NOP), "after")])
        got = {c.tag: c.status for c in [await q.recv(), await q.recv()]}
        assert got == {"boom": Status.ENGINE_FAULT, "after": Status.ENGINE_FAULT}
        assert q.disabled is not None
        with pytest.raises(QueueDisabled):
            q.submit(Request(Op.NOP))
        ev = await events.get()
        assert ev.kind == "crash"
        assert ev.qid == q.qid
        await _roundtrip(good)  # the other device never noticed
        await q.reset()
        assert dev.worker_of(q) not in (None, pid)  # a new worker serves it
        assert bytes(await s.do(b"x")) != b""
        assert dev.mgmt.stats()["worker_restarts"] >= 1


async def test_a_crash_fails_only_the_queue_whose_engine_crashed(ffw: AccelFramework) -> None:
    dev = ffw.device("bad-zip")
    dev.mgmt.clear_isolation()
    async with dev.queue() as q1, dev.queue() as q2:
        assert dev.worker_of(q1) != dev.worker_of(q2)  # one engine process per queue
        s2 = Session([q2], SessionSpec("zlib", level=9))
        data = b"a queue of its own " * 10_000
        for i in range(4):
            s2.submit(data, tag=i)  # in flight on q2 while q1's engine dies
        q1.submit_many([(Request(Op.INJECT, CRASH), "boom"), (Request(Op.NOP), "after")])
        assert {(await q1.recv()).status for _ in range(2)} == {Status.ENGINE_FAULT}
        got = [await s2.recv() for _ in range(4)]
        assert sorted(c.tag for c in got) == [0, 1, 2, 3]
        assert all(c.ok for c in got)
        assert q2.disabled is None
        assert q1.disabled is not None
        await q1.reset()
        assert bytes(await Session([q1], SessionSpec("zlib")).do(b"back")) != b""
    dev.mgmt.clear_isolation()


async def test_hang_is_killed_by_the_watchdog(ffw: AccelFramework) -> None:
    dev = ffw.device("bad-zip")
    async with dev.queue() as q:
        t = q.submit(Request(Op.INJECT, HANG))
        c = await q.recv()
        assert t.done
        assert c.status is Status.ENGINE_FAULT
        assert dev.mgmt.log[-1].kind == "hang"
        await dev.mgmt.reset_queue(q.qid)
        q.submit(Request(Op.NOP))
        assert (await q.recv()).ok


async def test_ring_error_disables_only_that_queue(ffw: AccelFramework) -> None:
    dev = ffw.device("bad-zip")
    async with dev.queue() as q, dev.queue() as other:
        q.submit(Request(Op.NOP))
        assert (await q.recv()).ok
        # scribble the next request's descriptor so it points outside the queue
        t = q._add(Request(Op.NOP), q, "scribbled")  # added, not yet published
        off = q.geometry.layout.desc - q.geometry.base
        whole = q.resources.region.view()
        for i in range(q.geometry.ring_size):
            addr, ln, fl, nx = DESC.unpack_from(whole, off + 16 * i)
            if addr == q.geometry.slot_addr(t.slot):
                DESC.pack_into(whole, off + 16 * i, 0xDEAD_0000_0000, ln, fl, nx)
        whole.release()
        q._kick()
        await q.wait_for(lambda: q.disabled is not None)
        # the scribbled request is failed by the framework, not answered
        assert [c.status for c in q.poll() if c.tag == "scribbled"] == [Status.ENGINE_FAULT]
        assert dev.mgmt.log[-1].kind == "ring"
        other.submit(Request(Op.NOP))
        assert (await other.recv()).ok
        await q.reset()
        q.submit(Request(Op.NOP))
        assert (await q.recv()).ok


async def test_isolation_after_isolate_strategy_faults(ffw: AccelFramework) -> None:
    dev = ffw.device("bad-zip")
    dev.mgmt.clear_isolation()  # earlier tests' faults count too
    assert dev.isolate_strategy == 3
    async with dev.queue() as q:
        while not dev.isolate:
            q.submit(Request(Op.INJECT, CRASH))
            assert (await q.recv()).status is Status.ENGINE_FAULT
            await q.reset()
        assert dev.attrs()["isolate"] == 1
        with pytest.raises(DeviceIsolated):
            await dev.open()
        # the software fallback still serves the algorithm
        s = await ffw.open_session("zlib")
        assert s.provider == "soft"
    dev.mgmt.clear_isolation()
    async with dev.queue():
        pass


async def _started(fw: AccelFramework, name: str):  # type: ignore[no-untyped-def]
    q = await fw.device(name).open()
    await q.start()
    return q
