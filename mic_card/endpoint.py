"""The asyncio face of one driver-side virtqueue, for card drivers.

Owns the loop around one :class:`virtio.split.DriverQueue` or
:class:`virtio.packed.DriverQueue` (the same shape; the bus builds the one
the device negotiated, VIRTIO_F_RING_PACKED): adding requests
(waiting for room when the ring is full), publishing a burst of them with one
``avail.idx`` store and at most one kick, resolving a future per request when
the host interrupts, and failing every outstanding request when the device is
removed, reset, or its used ring turns out malformed.

Buffer ownership: the caller allocates the buffers (card RAM) and passes
``release``; :meth:`DriverEndpoint.submit` either returns normally (the caller
owns the buffers again and frees them after reading the answer) or raises /
is cancelled, in which case ``release`` is called exactly once, as soon as the
host can no longer touch them.

Must not import ``transport`` or ``mic_host``; runs on the card's loop thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from virtio import packed, split, trace
from virtio.errors import BrokenResourceError, LocalProtocolError, MicError, WouldBlock
from virtio.split import QueueBroken, RingError

T = TypeVar("T")

__all__ = ["AnyDriverQueue", "DriverEndpoint", "Token"]

#: Either ring's driver side (``AnyDriverQueue[Token]``): the endpoint uses
#: only what both have.
AnyDriverQueue = split.DriverQueue[T] | packed.DriverQueue[T]

log = logging.getLogger(__name__)


Release = Callable[[], None]


class _Callback:
    """The ring token of a :meth:`DriverEndpoint.submit_callback` chain (one per
    chain: tokens are told apart by identity)."""

    __slots__ = ("on_done",)

    def __init__(self, on_done: Callable[[int], None]) -> None:
        self.on_done = on_done


#: What the ring carries for each chain: the future its submitter awaits, or
#: the callback to call from the interrupt.
Token = asyncio.Future[int] | _Callback


def _release(rel: Release) -> None:
    try:
        rel()
    except MicError as e:  # pragma: no cover - allocator misuse is a local bug
        log.error("releasing request buffers failed: %s", e)


class DriverEndpoint:
    """One virtqueue of a card device, with real queue depth.

    ``kick`` rings the device's c2h doorbell; the bus calls :meth:`on_interrupt`
    when the host rings the device's h2c doorbell and :meth:`fail` when the
    device goes away.
    """

    def __init__(
        self,
        queue: AnyDriverQueue[Token],
        kick: Callable[[], None],
        index: int,
        *,
        indirect_max: int = 0,
    ) -> None:
        self.queue = queue
        self.index = index
        self.size = queue.size
        self._kick = kick
        self._indirect_max = indirect_max if queue.indirect else 0
        # The completion table: each outstanding chain's token (the future its
        # submitter awaits, or its callback) -> how to free its buffers. No object
        # per request beyond the future.
        self._outstanding: dict[Token, Release | None] = {}
        self._max_segments = max(self.size, self._indirect_max)
        self._room = asyncio.Event()
        self._publish_handle: asyncio.Handle | None = None
        self._exc: BrokenResourceError | None = None
        self.submitted = 0
        self.completed = 0
        self.kicks = 0
        self.interrupts = 0
        self.errors = 0

    @property
    def broken(self) -> bool:
        return self._exc is not None

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def max_segments(self) -> int:
        """Longest chain this queue can ever take (more would wait forever)."""
        return self._max_segments

    # -- submitting ------------------------------------------------------------
    def submit_nowait(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        release: Callable[[], None] | None = None,
    ) -> asyncio.Future[int]:
        """Add one chain now; returns the future of its used length.

        Publication (and the kick) happens at the end of this loop iteration,
        once for every chain added in it. If this raises, ``release`` is not
        called: the caller still owns the buffers.

        Raises:
            WouldBlock: not enough free descriptors right now.
            BrokenResourceError: the device is gone or its ring broke.
            LocalProtocolError: a chain no ring of this size can hold, or bad buffers.
        """
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._add(readable, writable, fut, release)
        return fut

    def submit_callback(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        on_done: Callable[[int], None],
    ) -> None:
        """Add one chain now; ``on_done(used length)`` is called when the host
        completes it, from the interrupt (or :meth:`reclaim`) itself: no future,
        no loop iteration in between (a driver's receive buffers, transmit
        slots). ``on_done`` must not raise. If the queue fails it is not
        called: the driver's ``detach`` owns the buffers then.

        Raises: as :meth:`submit_nowait`.
        """
        self._add(readable, writable, _Callback(on_done), None)

    def _add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        tok: Token,
        release: Release | None,
    ) -> None:
        if self._exc is not None:
            raise BrokenResourceError(str(self._exc)) from self._exc
        nseg = len(readable) + len(writable)
        if nseg > self._max_segments:
            raise LocalProtocolError(
                f"chain of {nseg} buffers on a queue of {self.size} (indirect {self._indirect_max})"
            )
        try:
            self.queue.add(readable, writable, tok)
        except QueueBroken as e:
            self.fail(BrokenResourceError(f"queue {self.index} broken"))
            raise BrokenResourceError(str(e)) from e
        self._outstanding[tok] = release
        self.submitted += 1
        if trace.ON:
            trace.mark(trace.SUBMIT)
        if self._publish_handle is None:
            self._publish_handle = asyncio.get_running_loop().call_soon(self._publish)

    async def submit(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        release: Callable[[], None] | None = None,
    ) -> int:
        """Add one chain (waiting for room), wait for the host, return the used length.

        The used length is clamped to the chain's writable size by the ring core.

        Raises:
            BrokenResourceError: the device was removed/reset or the ring broke
                (``release`` has been called).
            LocalProtocolError: as :meth:`submit_nowait` (``release`` called).
        """
        try:
            while True:
                try:
                    fut = self.submit_nowait(readable, writable, release)
                    break
                except WouldBlock:
                    self._room.clear()
                    await self._room.wait()
        except BaseException:
            if release is not None:
                release()
            raise
        return await fut

    def _publish(self) -> None:
        self._publish_handle = None
        if self._exc is not None:
            return
        if self.queue.publish():
            self.kicks += 1
            if trace.ON:
                trace.mark(trace.DOORBELL)
            self._kick()

    def flush(self) -> None:
        """Publish and kick now instead of at the end of the loop iteration."""
        if self._publish_handle is not None:
            self._publish_handle.cancel()
            self._publish()

    # -- completions ----------------------------------------------------------------
    def on_interrupt(self) -> None:
        """The host interrupted: resolve every completed request. Never raises."""
        if self._exc is not None:
            return
        self.interrupts += 1
        self.reclaim()

    def reclaim(self) -> None:
        """Resolve every request the host completed, interrupt or not. Never raises.

        For a queue whose interrupts the driver suppressed
        (:meth:`suppress_interrupts`), this is how completions are reaped:
        on the next submit, when the ring runs low, or from a timer.
        """
        if self._exc is not None:
            return
        # Drain until a look at used.idx comes back empty: that last look
        # happens after the used_event store and its barrier, so a completion
        # the host published without interrupting us is still seen (Linux
        # loops on virtqueue_get_buf until it returns NULL for the same reason).
        while self._exc is None:  # a callback's resubmit may have found the ring broken
            try:
                done = self.queue.get_used_many()
            except (RingError, QueueBroken) as e:
                self.errors += 1
                log.error("queue %d: host wrote a bad used ring: %s", self.index, e)
                self.fail(BrokenResourceError(f"queue {self.index}: {e}"))
                return
            if not done:
                return
            table = self._outstanding
            self.completed += len(done)
            for tok, length in done:
                rel = table.pop(tok, None)
                if isinstance(tok, _Callback):
                    if trace.ON:
                        trace.mark(trace.COMPLETE)
                    self._call(tok.on_done, length)
                elif tok.done():  # cancelled by its submitter: buffers are ours to free
                    if rel is not None:
                        _release(rel)
                else:  # the submitter owns the buffers again
                    tok.set_result(length)
                    if trace.ON:
                        trace.mark(trace.COMPLETE)
            self._room.set()
            if self._publish_handle is not None:
                # Callbacks resubmitted (receive buffers): publish them before
                # looking again, so the ring core's fast path still applies.
                self.flush()

    def _call(self, cb: Callable[[int], None], length: int) -> None:
        try:
            cb(length)
        except Exception:  # a driver bug must not lose the rest of the batch
            log.exception("queue %d: completion callback failed", self.index)

    def suppress_interrupts(self) -> None:
        """Ask the host not to interrupt for this queue's completions (NO_INTERRUPT,
        or a lagging ``used_event`` with EVENT_IDX: the host may still interrupt
        once). The driver then reaps them with :meth:`reclaim`, as Linux
        virtio-net's transmit queue does without ``napi_tx``."""
        if self._exc is None:
            self.queue.disable_interrupts()

    def allow_interrupts(self) -> None:
        """Ask for interrupts again; what was completed meanwhile is reaped now
        (``virtqueue_enable_cb``: a completion published before the request would
        otherwise never interrupt)."""
        if self._exc is None and self.queue.enable_interrupts():
            self.reclaim()

    @property
    def interrupts_suppressed(self) -> bool:
        return not self.queue.interrupts_enabled

    def fail(self, exc: BrokenResourceError) -> None:
        """Fail every outstanding request with ``exc`` (device gone); idempotent."""
        if self._exc is None:
            self._exc = exc
        if self._publish_handle is not None:
            self._publish_handle.cancel()
            self._publish_handle = None
        pending, self._outstanding = self._outstanding, {}
        for tok, rel in pending.items():
            if rel is not None:
                _release(rel)
            if not isinstance(tok, _Callback) and not tok.done():
                tok.set_exception(BrokenResourceError(str(exc)))
        self._room.set()

    def stats(self) -> dict[str, int | bool]:
        return {
            "index": self.index,
            "size": self.size,
            "submitted": self.submitted,
            "completed": self.completed,
            "outstanding": len(self._outstanding),
            "kicks": self.kicks,
            "interrupts": self.interrupts,
            "interrupts_suppressed": not self.queue.interrupts_enabled,
            "errors": self.errors,
            "broken": self._exc is not None,
        }
