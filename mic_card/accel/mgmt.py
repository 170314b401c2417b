"""The management queue of a device (Revere-AMU's management interface) on split rings.

Owns the management protocol of one accelerator device: its byte layouts
(declared with ``construct``, each with a tested ``struct`` twin), the
*management unit* (the device side: :class:`MgmtUnit`) and the driver side
with the Python API on top (:class:`Management`: ``capabilities()``,
``stats()``, ``await reset_queue(qid)``, ``clear_isolation()``, ``faults()``).

Two split rings (``virtio.split``) in one memfd region, with one doorbell and
one interrupt (``transport.Mmio``), as virtio-crypto has a control queue and
virtio-balloon a stats queue:

- **control ring** (32 entries, 16 requests in flight): a request is a two-descriptor chain
  ``[MgmtReq (readable, 16 B) | response (writable)]``; the response is a
  ``MgmtRespHeader`` then the op's payload (``Caps``; ``DevStats`` + one
  ``QueueStatsEntry`` per queue). Queue resets complete out of order, when the
  reset is done.
- **event ring** (64 entries): the driver keeps it stocked with writable
  ``Event`` buffers (64 B); the unit fills one per fault (crash, hang, ring,
  access) and interrupts. Without a buffer the event is dropped and counted
  (``dropped_events``), as virtio-input drops events the driver gave no room for.

The management unit is emulated in the card OS process (on the hardware it is
the device's firmware): it serves its ring from a task that sleeps on the
doorbell. The synchronous getters (``capabilities()``, ``stats()``,
``clear_isolation()``) ring the doorbell and then *trap* into the unit, as an
MMIO write traps into QEMU's device model, so they keep their synchronous
signature; the bytes still go through the ring.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from construct import Bytes, Const, Float64l, Int8ul, Int32sl, Int32ul, Int64ul, Padding, Struct

from mic_card.accel.errors import AccelError
from mic_card.accel.owner import ManagedDevice
from mic_card.accel.qstate import QState
from mic_card.accel.wire import ALG_NAMES, API, QUEUE_RING_SIZE, Alg, StatusWord, align
from transport import Mmio, MmioLayout, NotifyMode, NotifyPolicy, Region
from virtio.errors import MicError, WouldBlock
from virtio.memory import FlatMemory
from virtio.split import DeviceQueue, DriverQueue, RingError, SplitLayout

__all__ = [
    "CAPS_STRUCT",
    "CTRL_RING",
    "CTRL_SLOTS",
    "EVENT_RING",
    "DEV_STATS_STRUCT",
    "EVENT_STRUCT",
    "MGMT_REQ_STRUCT",
    "MGMT_RESP_STRUCT",
    "QSTATS_STRUCT",
    "Caps",
    "DevStats",
    "Event",
    "EventKind",
    "FaultEvent",
    "Management",
    "MgmtGeometry",
    "MgmtOp",
    "MgmtReq",
    "MgmtRespHeader",
    "MgmtStatus",
    "MgmtUnit",
    "QueueStatsEntry",
]

log = logging.getLogger("mic_card.accel")

MGMT_VERSION = 1
#: one doorbell (driver -> unit) and one interrupt (unit -> driver)
MGMT_MMIO = MmioLayout.single()
CTRL_RING = 32
#: requests in flight at once (each is a two-descriptor chain)
CTRL_SLOTS = CTRL_RING // 2
EVENT_RING = 64
#: a caller waiting for an answer re-checks this often (bounds a lost interrupt)
_RECHECK = 0.1
#: the unit's and the driver's idle loops re-check this often (same reason)
_IDLE_RECHECK = 1.0


class MgmtOp(IntEnum):
    CAPABILITIES = 1
    STATS = 2
    RESET_QUEUE = 3
    CLEAR_ISOLATION = 4


class MgmtStatus(IntEnum):
    OK = 0
    NO_QUEUE = 1  #: no open queue with that id
    FAILED = 2  #: the operation failed (the reset raised)
    BAD_REQUEST = 3  #: unknown op, wrong version, short buffers


class EventKind(IntEnum):
    CRASH = 1
    HANG = 2
    RING = 3
    ACCESS = 4


_KIND_NAME = {k: k.name.lower() for k in EventKind}
_KIND_OF = {v: k for k, v in _KIND_NAME.items()}
_KIND_BY_VALUE = {int(k): v for k, v in _KIND_NAME.items()}

# --- layouts (construct: the source of truth; struct: the hot twins, tested) ------

MgmtReq = Struct(
    "version" / Const(MGMT_VERSION, Int8ul),
    "op" / Int8ul,
    Padding(2),
    "qid" / Int32ul,
    "tag" / Int64ul,
)
MGMT_REQ_STRUCT = struct.Struct("<BBxxIQ")
MgmtRespHeader = Struct("status" / Int8ul, Padding(3), "length" / Int32ul)
MGMT_RESP_STRUCT = struct.Struct("<B3xI")
Caps = Struct(
    "api_version" / Int32ul,
    "flags" / Int32ul,
    "max_queues" / Int32ul,
    "workers" / Int32ul,
    "ring_size" / Int32ul,
    "node" / Int32sl,
    "heap_size" / Int64ul,
    "algorithms" / Int64ul,  # bitmap: bit n = Alg(n)
    "chaining" / Int8ul,
    Padding(7),
)
CAPS_STRUCT = struct.Struct("<IIIIIiQQB7x")
DevStats = Struct(
    "faults" / Int32ul,
    "isolate" / Int8ul,
    Padding(3),
    "worker_restarts" / Int32ul,
    "queues" / Int32ul,
)
DEV_STATS_STRUCT = struct.Struct("<IB3xII")
_QSTAT_FIELDS = (
    "requests",
    "errors",
    "bytes_in",
    "bytes_out",
    "access_faults",
    "engine_ns",
    "submitted",
    "doorbells",
)
QueueStatsEntry = Struct("qid" / Int32ul, Padding(4), *(n / Int64ul for n in _QSTAT_FIELDS))
QSTATS_STRUCT = struct.Struct("<I4x8Q")
Event = Struct(
    "kind" / Int8ul,
    Padding(3),
    "qid" / Int32sl,  # -1: the device, not a queue
    "time" / Float64l,
    "detail" / Bytes(48),
)
EVENT_STRUCT = struct.Struct("<B3xid48s")
_STATUS_WORDS = (
    StatusWord.REQUESTS,
    StatusWord.ERRORS,
    StatusWord.BYTES_IN,
    StatusWord.BYTES_OUT,
    StatusWord.ACCESS_FAULTS,
    StatusWord.ENGINE_NS,
)


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """A fault notification of the management interface."""

    device: str
    qid: int | None
    kind: str  #: "crash", "hang", "ring", "access"
    detail: str
    time: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class MgmtGeometry:
    """Where the two rings and their buffers are in the management region (bus base 0)."""

    max_queues: int

    @property
    def ctrl(self) -> SplitLayout:
        return SplitLayout.contiguous(0, CTRL_RING)

    @property
    def event(self) -> SplitLayout:
        return SplitLayout.contiguous(self._event_off, EVENT_RING)

    @property
    def _event_off(self) -> int:
        return align(SplitLayout.contiguous_bytes(CTRL_RING), 4096)

    @property
    def resp_size(self) -> int:
        return align(
            MGMT_RESP_STRUCT.size
            + max(CAPS_STRUCT.size, DEV_STATS_STRUCT.size + QSTATS_STRUCT.size * self.max_queues)
        )

    @property
    def req_off(self) -> int:
        return align(self._event_off + SplitLayout.contiguous_bytes(EVENT_RING), 4096)

    @property
    def resp_off(self) -> int:
        return self.req_off + CTRL_SLOTS * align(MGMT_REQ_STRUCT.size)

    @property
    def event_buf_off(self) -> int:
        return self.resp_off + CTRL_SLOTS * self.resp_size

    @property
    def size(self) -> int:
        return align(self.event_buf_off + EVENT_RING * EVENT_STRUCT.size, 4096)

    def req(self, slot: int) -> int:
        return self.req_off + slot * align(MGMT_REQ_STRUCT.size)

    def resp(self, slot: int) -> int:
        return self.resp_off + slot * self.resp_size

    def event_buf(self, i: int) -> int:
        return self.event_buf_off + i * EVENT_STRUCT.size


class MgmtUnit:
    """The device side: serves the control ring and fills the event ring.

    Every chain is validated by the ring core; a malformed request is
    answered ``BAD_REQUEST`` (a malformed ring raises ``RingError`` and the
    unit stops serving until the device is re-created).
    """

    def __init__(
        self, device: ManagedDevice, mem: FlatMemory, geo: MgmtGeometry, mmio: Mmio
    ) -> None:
        self.device = device
        self.geo = geo
        self.mmio = mmio
        self.ctrl = DeviceQueue(mem, geo.ctrl, 0, require_readable=True, require_writable=True)
        self.events = DeviceQueue(mem, geo.event, 0, require_writable=True)
        for q in (self.ctrl, self.events):
            q.reset()
            q.activate()
        self.dropped_events = 0
        self.broken: str | None = None
        #: resets in progress: (head, qid, response view)
        self._resets: collections.deque[tuple[int, int, memoryview]] = collections.deque()

    def close(self) -> None:
        """Drop the ring views and the doorbells (the unit's task must be stopped)."""
        self.broken = self.broken or "closed"
        self._resets.clear()
        del self.ctrl, self.events
        self.mmio.close()

    def serve(self) -> bool:
        """Answer what the control ring holds (resets are queued); returns whether to interrupt."""
        if self.broken is not None:
            return False
        try:
            for chain in self.ctrl.pop_many():
                req, resp = chain.readable[0], chain.writable[0]
                n = self._answer(chain.head, req, resp)
                if n is not None:
                    self.ctrl.add_used(chain.head, n)
            return self.ctrl.publish_used()
        except RingError as e:
            self.broken = str(e)
            log.error("accel %s: management ring broken: %s", self.device.name, e)
            return False

    def _answer(self, head: int, req: memoryview, resp: memoryview) -> int | None:
        if len(req) < MGMT_REQ_STRUCT.size or len(resp) < MGMT_RESP_STRUCT.size:
            return 0
        ver, op, qid, _tag = MGMT_REQ_STRUCT.unpack_from(req)
        d = self.device
        body = resp[MGMT_RESP_STRUCT.size :]
        if ver != MGMT_VERSION or op not in MgmtOp.__members__.values():
            return self._status(resp, MgmtStatus.BAD_REQUEST)
        if op == MgmtOp.CAPABILITIES:
            bitmap = 0
            for a in d.algs:
                bitmap |= 1 << int(a)
            s = d.spec
            CAPS_STRUCT.pack_into(
                body, 0, int(API.rsplit("v", 1)[1]), int(d.flags), s.max_queues, s.workers,
                QUEUE_RING_SIZE, d.node_id, s.heap_size, bitmap, int(s.chaining),
            )  # fmt: skip
            return self._status(resp, MgmtStatus.OK, CAPS_STRUCT.size)
        if op == MgmtOp.STATS:
            started = [q for q in d.queues.values() if q.state is QState.STARTED]
            DEV_STATS_STRUCT.pack_into(
                body, 0, d.fault_count(), int(d.isolate), d.worker_restarts, len(started)
            )
            off = DEV_STATS_STRUCT.size
            for q in started:
                words = [q.status_word(w) for w in _STATUS_WORDS]
                QSTATS_STRUCT.pack_into(
                    body, off, q.qid, *words, q.stats.submitted, q.stats.doorbells
                )
                off += QSTATS_STRUCT.size
            return self._status(resp, MgmtStatus.OK, off)
        if op == MgmtOp.CLEAR_ISOLATION:
            d.clear_isolation()
            return self._status(resp, MgmtStatus.OK)
        if qid not in d.queues:  # RESET_QUEUE
            return self._status(resp, MgmtStatus.NO_QUEUE)
        self._resets.append((head, qid, resp))
        return None  # answered when the reset is done

    @staticmethod
    def _status(resp: memoryview, st: MgmtStatus, length: int = 0) -> int:
        MGMT_RESP_STRUCT.pack_into(resp, 0, st, length)
        return MGMT_RESP_STRUCT.size + length

    def post_event(self, ev: FaultEvent) -> bool:
        """Put ``ev`` in a driver-supplied event buffer; returns whether to interrupt."""
        if self.broken is not None:
            return False
        try:
            chain = self.events.pop()
        except RingError as e:
            self.broken = str(e)
            log.error("accel %s: management event ring broken: %s", self.device.name, e)
            return False
        if chain is None or len(chain.writable[0]) < EVENT_STRUCT.size:
            self.dropped_events += 1
            if chain is not None:
                self.events.add_used(chain.head, 0)
            return self.events.publish_used() if chain is not None else False
        EVENT_STRUCT.pack_into(
            chain.writable[0], 0, _KIND_OF.get(ev.kind, EventKind.CRASH),
            -1 if ev.qid is None else ev.qid, ev.time, ev.detail.encode()[:48],
        )  # fmt: skip
        self.events.add_used(chain.head, EVENT_STRUCT.size)
        return self.events.publish_used()

    async def run(self) -> None:
        """Serve on doorbells; run queue resets; interrupt the driver when asked."""
        vec, irq = self.mmio.vector(0), self.mmio.doorbell(0)
        async with asyncio.TaskGroup() as tg:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_IDLE_RECHECK):
                        await vec.wait()
                if self.serve():
                    irq.ring()
                while self._resets:
                    tg.create_task(self._reset(*self._resets.popleft()))

    async def _reset(self, head: int, qid: int, resp: memoryview) -> None:
        q = self.device.queues.get(qid)
        try:
            if q is None:
                st = MgmtStatus.NO_QUEUE
            else:
                await q.reset()
                st = MgmtStatus.OK
        except MicError as e:
            log.warning("accel %s: reset of queue %d failed: %s", self.device.name, qid, e)
            st = MgmtStatus.FAILED
        if self.broken is None:
            self.ctrl.add_used(head, self._status(resp, st))
            if self.ctrl.publish_used():
                self.mmio.doorbell(0).ring()


class Management:
    """A device's management interface (Revere-AMU), the driver side of its management queue.

    ``capabilities()``, ``stats()``, ``clear_isolation()`` (synchronous),
    ``await reset_queue(qid)``, ``faults()`` (an async context manager
    yielding an ``asyncio.Queue[FaultEvent]``) and ``log`` (the last 256
    faults, kept by the device as they happen).
    """

    def __init__(self, device: ManagedDevice, policy: NotifyPolicy | None = None) -> None:
        self._dev = device
        self.log: collections.deque[FaultEvent] = collections.deque(maxlen=256)
        self._subscribers: list[asyncio.Queue[FaultEvent]] = []
        self.geometry = geo = MgmtGeometry(device.spec.max_queues)
        pol = policy or NotifyPolicy(NotifyMode.EVENTFD)
        self._region = Region.create(f"accel-mgmt-{device.name}", geo.size)
        self._mmio = Mmio.create(MGMT_MMIO, pol)
        # the unit's end of the doorbells (in-process: its own view of the same MMIO)
        efds = [os.dup(fd) for fd in self._mmio.eventfds]
        mreg = Region.adopt("accel-mgmt-mmio", os.dup(self._mmio.region.fd), self._mmio.region.size)
        unit_mmio = Mmio.adopt(mreg, MGMT_MMIO, (efds[0],), (efds[1],), pol)
        self._view = self._region.view()
        mem = FlatMemory(self._view)
        self.unit = MgmtUnit(device, mem, geo, unit_mmio)
        self._ctrl: DriverQueue[int] = DriverQueue(mem, geo.ctrl, 0)
        self._events: DriverQueue[int] = DriverQueue(mem, geo.event, 0)
        self._free = list(range(CTRL_SLOTS - 1, -1, -1))
        self._done: dict[int, tuple[MgmtStatus, bytes]] = {}
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._tags = itertools.count(1)
        for i in range(EVENT_RING):
            self._events.add((), ((geo.event_buf(i), EVENT_STRUCT.size),), i)
        self._events.publish()
        self._closed = False

    # -- plumbing --------------------------------------------------------------------
    def _submit(self, op: MgmtOp, qid: int = 0) -> int:
        if self._closed:
            raise AccelError(f"{self._dev.name}: the management queue is closed")
        if not self._free:
            raise WouldBlock(f"{self._dev.name}: {CTRL_SLOTS} management requests in flight")
        slot = self._free.pop()
        g = self.geometry
        MGMT_REQ_STRUCT.pack_into(self._view, g.req(slot), MGMT_VERSION, op, qid, next(self._tags))
        self._ctrl.add(((g.req(slot), MGMT_REQ_STRUCT.size),), ((g.resp(slot), g.resp_size),), slot)
        if self._ctrl.publish():
            self._mmio.doorbell(0).ring()
        return slot

    def _reap(self) -> None:
        for slot, length in self._ctrl.get_used_many():
            if length < MGMT_RESP_STRUCT.size:
                self._done[slot] = (MgmtStatus.BAD_REQUEST, b"")
            else:
                off = self.geometry.resp(slot)
                st, n = MGMT_RESP_STRUCT.unpack_from(self._view, off)
                n = min(n, length - MGMT_RESP_STRUCT.size)
                body = bytes(
                    self._view[off + MGMT_RESP_STRUCT.size : off + MGMT_RESP_STRUCT.size + n]
                )
                self._done[slot] = (MgmtStatus(st) if st in MgmtStatus.__members__.values()
                                    else MgmtStatus.BAD_REQUEST, body)  # fmt: skip
            self._free.append(slot)
            fut = self._waiting.pop(slot, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        for i, length in self._events.get_used_many():
            if length >= EVENT_STRUCT.size:
                off = self.geometry.event_buf(i)
                kind, qid, t, detail = EVENT_STRUCT.unpack_from(self._view, off)
                ev = FaultEvent(
                    self._dev.name, None if qid < 0 else qid, _KIND_BY_VALUE.get(kind, "unknown"),
                    detail.rstrip(b"\0").decode(errors="replace"), t,
                )  # fmt: skip
                for q in self._subscribers:
                    q.put_nowait(ev)
            self._events.add((), ((self.geometry.event_buf(i), EVENT_STRUCT.size),), i)
        if self._events.publish():
            self._mmio.doorbell(0).ring()

    def _call_sync(self, op: MgmtOp, qid: int = 0) -> tuple[MgmtStatus, bytes]:
        slot = self._submit(op, qid)
        # Trap into the (emulated) management unit, as an MMIO write traps into
        # a device model: it answers now and we reap now, so its interrupt
        # request needs no delivery.
        self.unit.serve()
        self._reap()
        if slot not in self._done:
            raise AccelError(f"{self._dev.name}: the management unit did not answer")
        return self._done.pop(slot)

    async def _call(self, op: MgmtOp, qid: int = 0) -> tuple[MgmtStatus, bytes]:
        slot = self._submit(op, qid)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[slot] = fut
        self._reap()
        while slot not in self._done:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RECHECK):
                    await asyncio.shield(fut)
            self._reap()
        return self._done.pop(slot)

    async def run(self) -> None:
        """The driver's interrupt loop (completions and fault events) and the unit's loop."""
        vec = self._mmio.vector(0)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.unit.run(), name=f"accel-mgmt-unit-{self._dev.name}")
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_IDLE_RECHECK):
                        await vec.wait()
                self._reap()

    def close(self) -> None:
        """Free the region and doorbells (the tasks must be stopped first)."""
        if self._closed:
            return
        self._closed = True
        del self._ctrl, self._events
        self.unit.close()
        self._view.release()
        self._region.close()
        self._mmio.close()

    # -- the API ---------------------------------------------------------------------
    def capabilities(self) -> dict[str, Any]:
        """What the device offers (name, api, flags, algorithms, limits, node)."""
        st, body = self._call_sync(MgmtOp.CAPABILITIES)
        if st is not MgmtStatus.OK:
            raise AccelError(f"{self._dev.name}: capabilities: {st.name}")
        ver, flags, maxq, workers, ring, node, heap, bitmap, chaining = CAPS_STRUCT.unpack_from(
            body
        )
        algs = [a for a in sorted(Alg) if a and bitmap >> int(a) & 1]
        return {
            "name": self._dev.name,
            "api": f"mic-accel-v{ver}",
            "flags": flags,
            "algorithms": [ALG_NAMES[a] for a in algs],
            "chaining": bool(chaining),
            "max_queues": maxq,
            "workers": workers,
            "ring_size": ring,
            "heap_size": heap,
            "node": node,
        }

    async def reset_queue(self, qid: int) -> None:
        """Reset queue ``qid`` of this device (recovers it after a fault).

        Raises:
            KeyError: no such open queue.
            AccelError: the reset failed (a host channel, for one, is reopened instead).
        """
        st, _ = await self._call(MgmtOp.RESET_QUEUE, qid)
        if st is MgmtStatus.NO_QUEUE:
            raise KeyError(f"{self._dev.name} has no open queue {qid}")
        if st is not MgmtStatus.OK:
            raise AccelError(f"{self._dev.name}: reset of queue {qid}: {st.name}")

    def stats(self) -> dict[str, Any]:
        """Per-queue counters (from the status pages) and device totals."""
        st, body = self._call_sync(MgmtOp.STATS)
        if st is not MgmtStatus.OK:
            raise AccelError(f"{self._dev.name}: stats: {st.name}")
        faults, isolate, restarts, n = DEV_STATS_STRUCT.unpack_from(body)
        per: dict[int, dict[str, int]] = {}
        tot: collections.Counter[str] = collections.Counter()
        for i in range(n):
            qid, *vals = QSTATS_STRUCT.unpack_from(
                body, DEV_STATS_STRUCT.size + i * QSTATS_STRUCT.size
            )
            s = dict(zip(_QSTAT_FIELDS, vals, strict=True))
            per[qid] = s
            tot.update(s)
        return {
            "queues": per,
            "totals": dict(tot),
            "faults": faults,
            "isolate": bool(isolate),
            "worker_restarts": restarts,
            "dropped_events": self.unit.dropped_events,
        }

    def clear_isolation(self) -> None:
        """Forget the fault history and un-isolate the device."""
        st, _ = self._call_sync(MgmtOp.CLEAR_ISOLATION)
        if st is not MgmtStatus.OK:
            raise AccelError(f"{self._dev.name}: clear_isolation: {st.name}")

    def notify(self, ev: FaultEvent) -> None:
        """The device records a fault: log it and post it on the event ring."""
        self.log.append(ev)
        if not self._closed and self.unit.post_event(ev):
            self.unit.mmio.doorbell(0).ring()

    @contextlib.asynccontextmanager
    async def faults(self) -> AsyncIterator[asyncio.Queue[FaultEvent]]:
        """Subscribe to fault notifications: ``async with mgmt.faults() as q: await q.get()``."""
        q: asyncio.Queue[FaultEvent] = asyncio.Queue()
        self._subscribers.append(q)
        try:
            yield q
        finally:
            self._subscribers.remove(q)
