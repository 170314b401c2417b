"""Doorbells and interrupt vectors: shared-memory counters plus eventfds, in asyncio.

Owns the notification protocol between the two processes and the three ways to
wait for it (``NotifyMode``). Must not import anything above ``transport``.

Model (after the X100: drivers/misc/mic/host/mic_x100.c, card/mic_x100.c). A
*doorbell* belongs to the ringing side; ringing it routes the event to an
*interrupt vector* of the receiving side (MSI-X-like, with a mask and a
per-doorbell status, like the SBOX doorbell status register the ISR reads and
acks). Each vector is backed by

- ``count``  (u64, written only by the ringer): bumped on every ring;
- ``armed``  (u64, written only by the receiver): "I am about to sleep";
- ``mask``   (u64, written only by the receiver);
- an eventfd, written by the ringer only when ``armed`` is set.

A busy queue therefore costs no syscall on either side: the waiter sees the
counter move while it spins. Lost wake-ups are prevented with the classic
store/fence/load pairing (Dekker): the ringer does ``count += 1; fence; load
armed`` and the waiter does ``armed = 1; fence; load count`` — at least one of
the two sees the other's store. x86 is TSO but still reorders a store with a
later load (Intel SDM vol. 3A §9.2.3.4), hence the fence; CPython has no fence
primitive, so :func:`full_fence` borrows the ``lock cmpxchg`` inside an
uncontended lock acquire/release (a locked RMW is a full barrier, SDM §9.2.2).

Every word is read and written through a ``memoryview.cast('Q')`` element (one
aligned 8-byte store, never torn; ``struct.pack_into`` is not, see
reference/perf_baselines.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from virtio.errors import ClosedResourceError, LocalProtocolError, WouldBlock

__all__ = [
    "Doorbell",
    "NotifyMode",
    "NotifyPolicy",
    "Vector",
    "full_fence",
]

_MASK64 = (1 << 64) - 1
_FENCE_LOCK = threading.Lock()
#: counter checks between two clock reads while spinning (~2-3 µs of Python)
_SPIN_BATCH = 32
#: word offsets inside one vector's 64-byte slot
VEC_COUNT, VEC_ARMED, VEC_MASK = 0, 1, 2
VEC_WORDS = 8


def full_fence() -> None:
    """A full memory barrier (store→load ordering) between this and the next access."""
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


def _single_cpu() -> bool:
    try:
        return len(os.sched_getaffinity(0)) <= 1
    except OSError:  # pragma: no cover - not Linux
        return False


class NotifyMode(IntEnum):
    """How a vector waits (local choice of the receiver; the ringer never knows)."""

    EVENTFD = 0  #: arm at once and sleep on the eventfd (cheapest CPU, ~35-80 µs cross-core)
    POLL = 1  #: spin on the shared counter, never sleep (needs a core of its own)
    HYBRID = 2  #: spin up to ``spin_ns``, then arm and sleep on the eventfd


@dataclass(frozen=True, slots=True)
class NotifyPolicy:
    """Waiting policy of one vector.

    - ``spin_ns``: HYBRID spin budget before sleeping on the eventfd.
    - ``slice_ns``: longest synchronous spin before returning to the event loop
      (``await asyncio.sleep(0)``) so other tasks still run while we poll.
    - ``yield_ns``: how often a spinning waiter calls ``os.sched_yield()`` so a
      peer sharing our CPU gets to run; ``None`` = automatic: after every batch
      of checks when our affinity mask has a single CPU, else every 20 µs. A
      spin therefore never holds a CPU for a scheduler slice (milliseconds),
      which is what makes busy-polling on one core cost ~8 ms per round trip.
    """

    mode: NotifyMode = NotifyMode.HYBRID
    spin_ns: int = 50_000
    slice_ns: int = 50_000
    yield_ns: int | None = None

    def __post_init__(self) -> None:
        if (
            self.spin_ns < 0
            or self.slice_ns <= 0
            or (self.yield_ns is not None and self.yield_ns < 0)
        ):
            raise ValueError(f"invalid notify policy {self!r}")


class Doorbell:
    """The ringing side's handle on one doorbell: ``ring()`` is a posted write.

    Ringing never blocks and never fails: a doorbell rung at a dead peer is
    dropped, as a posted PCIe write would be. A route the receiver set to a
    vector that does not exist is counted in ``misroutes`` and dropped.
    """

    __slots__ = (
        "_count_idx",
        "_efds",
        "_n_vec",
        "_route_idx",
        "_vec_base",
        "_words",
        "index",
        "misroutes",
        "rings",
    )

    def __init__(
        self,
        index: int,
        words: memoryview,
        *,
        count_idx: int,
        route_idx: int,
        vec_base: int,
        efds: tuple[int, ...],
    ) -> None:
        self.index = index
        self._words = words
        self._count_idx = count_idx
        self._route_idx = route_idx
        self._vec_base = vec_base
        self._efds = efds
        self._n_vec = len(efds)
        self.rings = 0
        self.misroutes = 0

    def ring(self) -> None:
        """Ring the doorbell (wakes the receiving vector; no syscall unless it sleeps)."""
        w = self._words
        ci = self._count_idx
        w[ci] = (w[ci] + 1) & _MASK64  # doorbell status: count != ack at the receiver
        v = w[self._route_idx]
        self.rings += 1
        if v >= self._n_vec:
            self.misroutes += 1
            return
        vi = self._vec_base + v * VEC_WORDS
        w[vi] = (w[vi] + 1) & _MASK64
        full_fence()  # store count / load armed must not be reordered (see module doc)
        if w[vi + VEC_ARMED]:
            os.eventfd_write(self._efds[v], 1)


class Vector:
    """The receiving side's interrupt vector: wait for rings routed to it.

    ``await v.wait()`` returns how many rings arrived since the previous
    return (coalesced, >= 1). ``wait_nowait()`` raises :class:`WouldBlock`
    instead of waiting. While masked, rings are held pending (the count moves)
    and delivered on ``unmask()`` (MSI-X pending-bit semantics). After
    :meth:`fail` (link lost) every wait raises the given error.
    """

    def __init__(
        self,
        index: int,
        words: memoryview,
        *,
        base: int,
        efd: int,
        policy: NotifyPolicy,
    ) -> None:
        self.index = index
        self._words = words
        self._ci = base + VEC_COUNT
        self._ai = base + VEC_ARMED
        self._mi = base + VEC_MASK
        self._efd = efd
        self.policy = policy
        self._seen = 0  # MMIO starts zeroed: rings made before we attached are pending
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unmasked = asyncio.Event()
        self._unmasked.set()
        self._error: BaseException | None = None
        self._closed = False
        self._serving: Callable[[int], None] | None = None
        #: statistics: returns by path
        self.wakeups_spin = 0
        self.wakeups_eventfd = 0
        self.sleeps = 0
        words[self._ai] = 0
        words[self._mi] = 0

    # -- state -------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """True when rings arrived that no wait returned yet (the status bit)."""
        return self._words[self._ci] != self._seen

    @property
    def masked(self) -> bool:
        return bool(self._words[self._mi])

    def mask(self) -> None:
        """Hold deliveries; rings stay pending until :meth:`unmask`."""
        self._words[self._mi] = 1
        self._unmasked.clear()

    def unmask(self) -> None:
        """Deliver held rings (a waiter returns at once if any are pending)."""
        self._words[self._mi] = 0
        self._unmasked.set()
        if self._serving is not None and self._loop is not None:
            self._loop.call_soon(self._deliver)

    def fail(self, exc: BaseException) -> None:
        """Make current and future waits raise ``exc`` (used on link loss)."""
        if self._error is None:
            self._error = exc
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)
        self._unmasked.set()

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"vector {self.index} is closed")
        if self._error is not None:
            raise self._error

    def _take(self) -> int:
        c = self._words[self._ci]
        if c == self._seen:
            return 0
        n = (c - self._seen) & _MASK64
        self._seen = c
        return n

    # -- waiting -----------------------------------------------------------
    def wait_nowait(self) -> int:
        """Return the number of rings since the last return, or raise.

        Raises:
            WouldBlock: nothing pending (or masked).
            LinkLost / ClosedResourceError: the vector failed or was closed.
        """
        self._check()
        if self.masked:
            raise WouldBlock(f"vector {self.index} is masked")
        n = self._take()
        if not n:
            raise WouldBlock(f"vector {self.index}: nothing pending")
        return n

    async def wait(self) -> int:
        """Wait for at least one ring; return how many arrived (coalesced).

        Raises:
            LinkLost: the link to the peer was lost (see :meth:`fail`).
            ClosedResourceError: the vector was closed.
            LocalProtocolError: the vector is being served (:meth:`serve`).
        """
        if self._serving is not None:
            raise LocalProtocolError(f"vector {self.index} is being served (Vector.serve)")
        spun = False
        while True:
            self._check()
            if not self._unmasked.is_set():
                await self._unmasked.wait()
                continue
            n = self._take()
            if n:
                return n
            mode = self.policy.mode
            if mode is NotifyMode.POLL:
                if self._spin(self.policy.slice_ns):
                    self.wakeups_spin += 1
                    continue
                await asyncio.sleep(0)
                continue
            if mode is NotifyMode.HYBRID and not spun:
                spun = True
                if await self._spin_budget(self.policy.spin_ns):
                    self.wakeups_spin += 1
                    continue
            await self._sleep()
            spun = False

    def _spin(self, budget_ns: int) -> bool:
        """Spin (synchronously) up to ``budget_ns`` for the counter to move."""
        w, ci, seen = self._words, self._ci, self._seen
        if w[ci] != seen:
            return True
        now = time.perf_counter_ns()
        deadline = now + budget_ns
        yield_ns = self.policy.yield_ns
        if yield_ns is None:
            yield_ns = 0 if _single_cpu() else 20_000
        next_yield = now + yield_ns
        while True:
            for _ in range(_SPIN_BATCH):
                if w[ci] != seen:
                    return True
            now = time.perf_counter_ns()
            if now >= deadline:
                return False
            if now >= next_yield:
                os.sched_yield()  # let a peer on our CPU run (graceful single-core polling)
                next_yield = now + yield_ns

    async def _spin_budget(self, budget_ns: int) -> bool:
        slice_ns = self.policy.slice_ns
        deadline = time.perf_counter_ns() + budget_ns
        while True:
            left = deadline - time.perf_counter_ns()
            if left <= 0:
                return False
            if self._spin(min(left, slice_ns)):
                return True
            if left > slice_ns:
                await asyncio.sleep(0)
                self._check()

    def _on_readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _sleep(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._efd)
            loop.add_reader(self._efd, self._on_readable)
            self._loop = loop
        fut: asyncio.Future[None] = loop.create_future()
        self._waiter = fut
        w = self._words
        w[self._ai] = 1
        full_fence()  # store armed / load count (see module doc)
        try:
            if w[self._ci] != self._seen:
                return
            self.sleeps += 1
            await fut
            self.wakeups_eventfd += 1
        finally:
            w[self._ai] = 0
            self._waiter = None

    # -- serving from the eventfd callback ----------------------------------------
    async def serve(self, on_rings: Callable[[int], None]) -> None:
        """Call ``on_rings(n)`` from the eventfd's reader callback whenever rings
        arrived, until the vector fails or is closed; never returns otherwise.

        What a :meth:`wait` loop does, one loop iteration and one task switch
        sooner: the work runs in the callback that noticed the ring, as an
        ISR does. The vector stays armed while served (the ringer always
        writes the eventfd), so each loop iteration delivers at most once:
        a peer that never stops ringing gets one call per iteration and
        everything else on the loop runs between them. Masked rings are held
        and delivered on :meth:`unmask`. ``on_rings`` raising ends the serve
        with its exception.

        Raises:
            LinkLost: the link to the peer was lost (see :meth:`fail`).
            ClosedResourceError: the vector was closed.
            LocalProtocolError: it is already being waited on or served.
        """
        self._check()
        if self._waiter is not None:
            raise LocalProtocolError(f"vector {self.index} is already being waited on")
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop and not self._loop.is_closed():
            self._loop.remove_reader(self._efd)
        self._loop = loop
        loop.add_reader(self._efd, self._on_serve_readable)
        done: asyncio.Future[None] = loop.create_future()
        self._waiter = done
        self._serving = on_rings
        w = self._words
        w[self._ai] = 1
        full_fence()  # store armed / load count: rings before this are seen below
        loop.call_soon(self._deliver)
        try:
            await done
        finally:
            self._serving = None
            self._waiter = None
            if not self._closed:  # closed: the MMIO words and the eventfd are gone
                w[self._ai] = 0
                if not loop.is_closed():
                    loop.add_reader(self._efd, self._on_readable)

    def _on_serve_readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)  # first: a ring after it makes the fd readable again
        self._deliver()

    def _deliver(self) -> None:
        cb, done = self._serving, self._waiter
        if cb is None or done is None or done.done() or self.masked:
            return
        n = self._take()
        if not n:
            return
        self.wakeups_eventfd += 1
        try:
            cb(n)
        except Exception as e:  # the server's own bug: end serve() with it, not the loop
            done.set_exception(e)

    def close(self) -> None:
        """Stop waiting on the eventfd (idempotent; the fd itself belongs to the Mmio)."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._efd)
        self._loop = None
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(ClosedResourceError(f"vector {self.index} was closed"))
