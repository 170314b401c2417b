"""The app side of one accelerator queue (uacce queue + UADK user driver).

Owns a queue's life (INIT -> STARTED -> ZOMBIE, the table below), the driver
side of its split ring (``virtio.split.DriverQueue``), the request slots, the
two memory modes (shared buffers for SVA devices, a reserved bounce pool for
every device) and the three ways to receive: :meth:`AccelQueue.poll` (reads
shared memory only: no system call), ``recv_nowait`` and ``await recv()``
(sleeps on the queue's interrupt vector).

Nothing here talks to the worker process: starting, resetting and putting a
queue are asked of the owning device through
:class:`mic_card.accel.owner.QueueOwner` (the framework implements it and
hands the queue's fds to an engine worker). Never imports the framework.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from mic_card.accel.channel import QueueResources
from mic_card.accel.errors import QueueDisabled, QueueStateError
from mic_card.accel.owner import QueueOwner
from mic_card.accel.qstate import TRANSITIONS, QState, QueueStats
from mic_card.accel.request import (
    BounceRing,
    Completion,
    CompletionSink,
    Data,
    Request,
    SharedBuffer,
    Ticket,
)
from mic_card.accel.wire import (
    RESP_OFF,
    SLOT_SIZE,
    QueueGeometry,
    Status,
    StatusWord,
    pack_request,
    read_response,
)
from transport import NotifyPolicy
from virtio.errors import (
    ClosedResourceError,
    LocalProtocolError,
    MicError,
    ResourceError,
    WouldBlock,
)
from virtio.memory import FirstFitAllocator, FlatMemory
from virtio.split import DriverQueue, RingError

# Request values and queue states live below (request.py, qstate.py);
# re-exported here, where callers have always imported them from.
__all__ = [
    "TRANSITIONS",
    "AccelQueue",
    "Completion",
    "CompletionSink",
    "Data",
    "QState",
    "QueueStats",
    "Request",
    "SharedBuffer",
    "Ticket",
]

#: ``submit_many`` makes a long batch visible in pieces of this many requests:
#: the engine starts on the first piece while the app writes the rest (the
#: kick itself still follows the ring core's notification suppression).
PUBLISH_EVERY = 4


@dataclass(slots=True)
class _Pools:
    bounce: BounceRing
    bounce_off: int
    #: first fit over offsets ``[0, shared size)`` of the shared half; None without SVA
    shared: FirstFitAllocator | None
    shared_off: int
    shared_live: dict[int, SharedBuffer] = field(default_factory=dict)


class AccelQueue:
    """One queue of a device: its own region, ring, doorbells and address space (PASID).

    Get one with ``await device.open()`` (state INIT), then ``await start()``;
    ``await put()`` releases it (ZOMBIE) and ``aclose()`` frees it. As an async
    context manager it starts on entry and is released on exit.
    """

    def __init__(
        self,
        device: QueueOwner,
        qid: int,
        res: QueueResources,
        *,
        sva: bool,
        policy: NotifyPolicy,
    ) -> None:
        self.device = device
        self.qid = qid
        self.state = QState.INIT
        self.sva = sva
        self.policy = policy
        self.stats = QueueStats()
        self._res = res
        geo = res.geometry
        self.geometry: QueueGeometry = geo
        self.pasid = geo.pasid
        self._whole = res.region.view()
        self.memory = FlatMemory(self._whole, base=geo.base)
        self._words = self._whole[:4096].cast("Q")
        self._dq: DriverQueue[Ticket] = DriverQueue(self.memory, geo.layout, 0)
        self._dq.disable_interrupts()
        self._heap = self._whole[geo.heap_off :]
        half = geo.heap_size // 2 if sva else geo.heap_size
        half -= half % 4096
        self._pools = _Pools(
            BounceRing(geo.heap_size - half if sva else geo.heap_size),
            geo.heap_off,
            FirstFitAllocator(0, half, what="shared heap") if sva and half > 0 else None,
            geo.heap_off + (geo.heap_size - half),
        )
        self._free_slots = list(range(geo.slots - 1, -1, -1))
        # per slot, precomputed: header offset, response offset, its one descriptor
        base = geo.base
        self._hdr_off = [geo.slot_addr(s) - base for s in range(geo.slots)]
        self._resp_off = [off + RESP_OFF for off in self._hdr_off]
        self._descs = [((geo.slot_addr(s), SLOT_SIZE),) for s in range(geo.slots)]
        self._tickets: dict[int, Ticket] = {}
        #: publish (and kick if the engine asks) every this many requests of a batch
        self.publish_every = PUBLISH_EVERY
        self._ready: collections.deque[Completion] = collections.deque()
        self._disabled: str | None = None
        self._reaping = False
        self._progress = asyncio.Event()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------
    def _move(self, event: str) -> None:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise QueueStateError(f"queue {self.qid}: cannot {event} in state {self.state}")
        self.state = nxt

    async def start(self) -> None:
        """INIT -> STARTED: hand the queue to an engine worker (uacce START_Q).

        Raises:
            QueueStateError: not in INIT.
        """
        if (self.state, "start") not in TRANSITIONS:
            self._move("start")
        await self.device.attach(self)
        self._move("start")

    async def put(self) -> None:
        """Stop the queue at once (uacce PUT_Q): in-flight requests end with QUEUE_RESET."""
        if self.state is QState.ZOMBIE:
            return
        was_started = self.state is QState.STARTED
        self._move("put")
        self._words[StatusWord.DISABLED] = 1
        if was_started:
            await self.device.detach(self)
        self._fail_all(Status.QUEUE_RESET, "queue put")

    async def reset(self) -> None:
        """Recover a disabled queue (engine fault, ring error): new doorbells, empty ring.

        In-flight requests end with QUEUE_RESET; streams are forgotten.

        Raises:
            QueueStateError: the queue is not STARTED.
        """
        self._move("reset")
        self._words[StatusWord.DISABLED] = 1
        await self.device.detach(self)
        self._fail_all(Status.QUEUE_RESET, "queue reset")
        self._res.renew_mmio(self.policy)
        self._dq.reset()
        self._dq.disable_interrupts()
        self._pools.bounce.reset()
        self._disabled = None
        for w in (StatusWord.BUSY_SINCE, StatusWord.DISABLED):
            self._words[w] = 0
        await self.device.attach(self)

    async def aclose(self) -> None:
        """Put the queue and free its memory (idempotent)."""
        if self._closed:
            return
        try:
            await self.put()
        finally:
            self._closed = True
            self._tickets.clear()
            for buf in list(self._pools.shared_live.values()):
                buf.view.release()
            self._pools.shared_live.clear()
            self._words.release()
            self._heap.release()
            del self._dq
            del self.memory
            self._whole.release()
            self._res.close()
            self.device.released(self)

    async def __aenter__(self) -> AccelQueue:
        if self.state is QState.INIT:
            await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def resources(self) -> QueueResources:
        return self._res

    def attach_request(self) -> tuple[dict[str, Any], list[int]]:
        """What the worker's ``attach`` needs beyond the geometry: its own region and MMIO."""
        return {}, self._res.fds()

    @property
    def disabled(self) -> str | None:
        """Why the queue is disabled (None when usable)."""
        if self._disabled is None and self._words[StatusWord.DISABLED]:
            return "disabled"
        return self._disabled

    def status_word(self, w: StatusWord) -> int:
        return int(self._words[w])

    @property
    def closed(self) -> bool:
        return self._closed

    # -- faults (called by the framework) ------------------------------------------
    def fault(self, reason: str) -> None:
        """Disable the queue and fail everything in flight with ENGINE_FAULT."""
        if self.state is not QState.STARTED:
            return
        self._move("fault")
        self.stats.faults += 1
        self._disabled = reason
        self._words[StatusWord.DISABLED] = 1
        self._fail_all(Status.ENGINE_FAULT, reason)
        self._res.mmio.fail(QueueDisabled(f"queue {self.qid}: {reason}"))

    def _fail_all(self, status: Status, why: str) -> None:
        for t in list(self._tickets.values()):
            self._finish(t, Completion(status, 0, 0, b"", t.tag, 0))
        self.stats.completed += len(self._tickets)
        self._tickets.clear()
        self._free_slots = list(range(self.geometry.slots - 1, -1, -1))
        self._wake()

    # -- memory --------------------------------------------------------------------
    def alloc(self, size: int) -> SharedBuffer:
        """Share ``size`` bytes with this queue (SVA devices only); free with ``buf.free()``.

        Raises:
            LocalProtocolError: the device has no SVA, or size <= 0.
            WouldBlock: the shared heap is full.
        """
        self._check_open()
        if not self.sva:
            raise LocalProtocolError(
                f"{self.device.name} has no SVA: requests go through the bounce pool"
            )
        if size <= 0:
            raise LocalProtocolError(f"cannot share {size} bytes")
        shared = self._pools.shared
        try:
            off = shared.alloc(size) if shared is not None else None
        except ResourceError:  # FirstFitAllocator: exhausted
            off = None
        if off is None:
            raise WouldBlock(f"shared heap of queue {self.qid} is full")
        roff = self._pools.shared_off + off
        view = self._whole[roff : roff + size]
        buf = SharedBuffer(self, self.geometry.base + roff, size, view, off)
        self._pools.shared_live[off] = buf
        return buf

    def free_shared(self, buf: SharedBuffer) -> None:
        """Give a shared buffer back (``buf.free()``)."""
        if self._pools.shared_live.pop(buf._off, None) is buf:
            buf.view.release()
            assert self._pools.shared is not None  # a buffer came from it
            self._pools.shared.free(buf._off)

    @property
    def bounce_size(self) -> int:
        return self._pools.bounce.size

    # -- submitting ------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"queue {self.qid} is closed")

    def _check_usable(self) -> None:
        if self.state is not QState.STARTED:
            self._check_open()
            raise QueueStateError(f"queue {self.qid} is {self.state}, not started")
        if self._disabled is not None or self._words[StatusWord.DISABLED]:
            raise QueueDisabled(f"queue {self.qid} is disabled ({self.disabled}); reset it")

    def _place(
        self, data: Data | SharedBuffer, bounce: list[list[int]], ln: int | None = None
    ) -> tuple[int, int, memoryview | None]:
        """Bus address and length of ``data`` in this queue (copying bytes into the pool)."""
        if isinstance(data, SharedBuffer):
            # Another queue's buffer too: pass its address and let the engine
            # refuse it (that is the PASID check the tests exercise).
            return data.addr, len(data), data.view
        n = len(data) if ln is None else ln
        if not n:
            return 0, 0, None
        blk = self._pools.bounce.alloc(n)
        if blk is None:
            raise WouldBlock(f"bounce pool of queue {self.qid} is full")
        bounce.append(blk)
        off = self._pools.bounce_off + blk[0] % self._pools.bounce.size
        view = self._whole[off : off + n]
        if ln is None:
            view[:] = data
        return self.geometry.base + off, n, view

    def _add(self, req: Request, owner: CompletionSink, tag: Any) -> Ticket:
        free = self._free_slots
        if not free:
            raise WouldBlock(f"queue {self.qid}: all {self.geometry.slots} slots in flight")
        src, aad, dst = req.src, req.aad, req.dst
        bounce: list[list[int]] | tuple[()] = ()
        # The hot path (NOP, SharedBuffers, no bounce copies) builds nothing;
        # anything that needs the bounce pool goes through _place.
        if (src and not isinstance(src, SharedBuffer)) or (
            (aad and not isinstance(aad, SharedBuffer)) or (dst is None and req.dst_len)
        ):
            bounce = []
            try:
                sa, sl, _ = self._place(src, bounce) if src else (0, 0, None)
                aa, al, _ = self._place(aad, bounce) if aad else (0, 0, None)
                dview: memoryview | None
                if dst is not None:
                    da, dl, dview = dst.addr, dst.size, dst.view
                elif req.dst_len:
                    da, dl, dview = self._place(b"", bounce, req.dst_len)
                else:
                    da, dl, dview = 0, 0, None
            except BaseException:
                for b in bounce:
                    self._pools.bounce.free(b)
                raise
        else:
            sa, sl = (src.addr, src.size) if isinstance(src, SharedBuffer) else (0, 0)
            aa, al = (aad.addr, aad.size) if isinstance(aad, SharedBuffer) else (0, 0)
            da, dl, dview = (dst.addr, dst.size, dst.view) if dst is not None else (0, 0, None)
        if req.src_addr is not None:
            sa = req.src_addr
        if req.dst_addr is not None:
            da = req.dst_addr
        slot = free.pop()
        pack_request(
            self._whole, self._hdr_off[slot], req.op, req.alg, req.alg2, req.level, req.flags,
            req.stream_id, req.key, req.iv, req.tag_len, sa, sl, da, dl, aa, al,
        )  # fmt: skip
        t = Ticket(slot, owner, tag, dst, dview, bounce)
        try:
            self._dq.add((), self._descs[slot], t)
        except BaseException:
            free.append(slot)
            for b in bounce:
                self._pools.bounce.free(b)
            raise
        self._tickets[slot] = t
        return t

    def submit(
        self, req: Request, *, tag: Any = None, owner: CompletionSink | None = None
    ) -> Ticket:
        """Submit one request and ring the doorbell.

        Raises:
            WouldBlock: no free slot or bounce space (poll, then retry).
            QueueDisabled, QueueStateError: see :meth:`_check_usable`.
        """
        return self.submit_many(((req, tag),), owner=owner)[0]

    def submit_many(
        self, reqs: Iterable[tuple[Request, Any]], *, owner: CompletionSink | None = None
    ) -> list[Ticket]:
        """Submit a batch with one doorbell. On WouldBlock the requests before it are sent.

        Raises:
            WouldBlock: out of slots or bounce space part-way (already-added ones go out).
        """
        self._check_usable()
        own: CompletionSink = owner if owner is not None else self
        out: list[Ticket] = []
        add = self._add
        every = self.publish_every
        dq = self._dq
        kicked = owed = False
        try:
            for req, tag in reqs:
                # Early publish: the engine starts on a piece while we add the
                # rest. Only the first piece rings at once; a later piece the
                # ring core wants a kick for owes one, paid at the end.
                if out and not len(out) % every and dq.publish():
                    if kicked:
                        owed = True
                    else:
                        self._ring()
                        kicked = True
                out.append(add(req, own, tag))
        finally:
            if out:
                if dq.publish() or owed:
                    self._ring()
                self.stats.submitted += len(out)
        return out

    def _kick(self) -> None:
        if self._dq.publish():
            self._ring()

    def _ring(self) -> None:
        self._res.mmio.doorbell(0).ring()
        self.stats.doorbells += 1

    # -- receiving -----------------------------------------------------------------
    def _finish(self, t: Ticket, c: Completion) -> None:
        t.done = True
        if t.bounce:
            for b in t.bounce:
                self._pools.bounce.free(b)
        fut = t.future
        if fut is None:
            t.owner._ready.append(c)
        elif not fut.done():
            fut.set_result(c)

    def _reap(self) -> int:
        """Collect completions from the used ring (shared memory only; no system call)."""
        if self._closed or self.state is not QState.STARTED:
            return 0
        if self._disabled is None and self._words[StatusWord.DISABLED] and self._tickets:
            self.fault("disabled by the framework")
            return 0
        try:
            done = self._dq.get_used_many()
        except (RingError, MicError) as e:
            self.fault(f"used ring: {e}")
            self.device.ring_fault(self, str(e))
            return 0
        if not done:
            return 0
        whole = self._whole
        resp_off = self._resp_off
        free_slot = self._free_slots.append
        pop_ticket = self._tickets.pop
        bounce_free = self._pools.bounce.free
        for t, length in done:
            slot = t.slot
            free_slot(slot)
            pop_ticket(slot, None)
            if length < SLOT_SIZE:  # the engine did not answer in the slot
                c = Completion(Status.INVALID_REQUEST, 0, 0, b"", t.tag)
            else:
                st, consumed, produced, detail = read_response(whole, resp_off[slot])
                dv = t.dst_view
                if produced and dv is not None:
                    produced = min(produced, len(dv))
                    out: bytes | memoryview = (
                        dv[:produced] if t.dst is not None else bytes(dv[:produced])
                    )
                else:
                    out = b""
                c = Completion(st, consumed, produced, out, t.tag, detail)
            # _finish, inlined (the per-completion hot path)
            t.done = True
            if t.bounce:
                for b in t.bounce:
                    bounce_free(b)
            fut = t.future
            if fut is None:
                t.owner._ready.append(c)
            elif not fut.done():
                fut.set_result(c)
        self.stats.completed += len(done)
        self._wake()
        return len(done)

    def _wake(self) -> None:
        ev, self._progress = self._progress, asyncio.Event()
        ev.set()

    def poll(self, limit: int | None = None) -> list[Completion]:
        """Completions of requests submitted on the queue itself; never a system call."""
        self._reap()
        r = self._ready
        n = len(r) if limit is None else min(limit, len(r))
        return [r.popleft() for _ in range(n)]

    def recv_nowait(self) -> Completion:
        """One completion, or raise WouldBlock (no system call)."""
        self._reap()
        if not self._ready:
            raise WouldBlock(f"queue {self.qid}: nothing completed")
        return self._ready.popleft()

    async def recv(self) -> Completion:
        """Wait (sleeping on the queue's interrupt) for one completion.

        Raises:
            QueueDisabled: the queue was disabled while nothing was pending for us.
        """
        r = self._ready
        await self.wait_for(lambda: bool(r))
        return r.popleft()

    @property
    def outstanding(self) -> int:
        return len(self._tickets)

    async def wait_for(self, cond: Any) -> None:
        """Sleep until ``cond()`` is true, reaping completions; one waiter sleeps on the vector.

        Raises:
            QueueDisabled: the queue is disabled and ``cond`` cannot become true.
        """
        while not cond():
            self._reap()
            if cond():
                return
            if self._closed:
                raise ClosedResourceError(f"queue {self.qid} is closed")
            if self._reaping:
                await self._progress.wait()
                continue
            if not self._tickets:
                self._check_usable()
                raise QueueStateError(f"queue {self.qid}: waiting with nothing in flight")
            self._reaping = True
            try:
                if self._dq.enable_interrupts():
                    continue
                self.stats.sleeps += 1
                try:
                    await self._res.mmio.vector(0).wait()
                except QueueDisabled:
                    self._reap()
                    continue
                except (MicError, ClosedResourceError):
                    if self._disabled is not None:
                        continue
                    raise
            finally:
                self._reaping = False
                self._dq.disable_interrupts()
                self._wake()

    async def wait_ticket(self, t: Ticket) -> Completion:
        """Wait for one ticket's completion (the ticket must have been given a future)."""
        fut = t.future
        assert fut is not None
        await self.wait_for(fut.done)
        return fut.result()
