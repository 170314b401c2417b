"""The asyncio face of one device-side virtqueue, for host backends.

Owns the loop around one :class:`virtio.split.DeviceQueue` or
:class:`virtio.packed.DeviceQueue` (the same shape; VOP picks the one the
card negotiated, VIRTIO_F_RING_PACKED): waiting for the
card's doorbell (with notification suppression and the re-check that avoids a
lost wake-up), batching used-ring publication at the end of a burst, raising
the card's interrupt when the ring core says so, and the per-queue counters.

The queue itself is created and destroyed by :class:`mic_host.vop.VopDevice`
(on DRIVER_OK, on reset, on NEEDS_RESET, on removal); the endpoint outlives it,
so a backend keeps one endpoint object for the device's whole life and simply
sees :class:`~virtio.errors.BrokenResourceError` (then waits with
:meth:`QueueEndpoint.wait_live`) across a reset. :meth:`QueueEndpoint.chains`
hides that dance for the common backend loop.

Must not import ``transport`` or ``mic_card``; it runs on the host's event
loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from enum import Enum
from typing import Protocol, TypeVar

from virtio import packed, split, trace
from virtio.errors import (
    BrokenResourceError,
    ClosedResourceError,
    LocalProtocolError,
    MicError,
    WouldBlock,
)
from virtio.split import Chain, QueueBroken, RingError

__all__ = ["AnyDeviceQueue", "EndpointOwner", "EndpointState", "QueueEndpoint"]

#: Either ring's device side: the endpoint uses only what both have.
AnyDeviceQueue = split.DeviceQueue | packed.DeviceQueue

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class EndpointOwner(Protocol):
    """What an endpoint needs from its device (implemented by ``VopDevice``)."""

    def _interrupt(self) -> None:
        """Raise the card's interrupt for this device (h2c_vdev_db)."""

    def _ring_error(self, index: int, exc: MicError) -> None:
        """The card broke queue ``index``: move the device to NEEDS_RESET."""

    def _published(self, index: int, next_avail: int) -> None:
        """Used entries were published; mirror ``next_avail`` into ``_mic_vring_info``."""


class EndpointState(Enum):
    IDLE = "idle"  # no ring yet (before DRIVER_OK, or after a reset)
    LIVE = "live"  # ring attached and activated
    BROKEN = "broken"  # the device is NEEDS_RESET; waits for the card to reset it
    CLOSED = "closed"  # the device was removed; terminal


class QueueEndpoint:
    """One virtqueue of a host device, as backends use it.

    - :meth:`get` / :meth:`get_nowait` pop the next descriptor chain.
    - :meth:`put` completes a chain; the used index is published (and the
      card interrupted if it wants) once per event-loop iteration, so a burst
      of completions costs one store and at most one doorbell.
    - Pending :meth:`get` calls raise :class:`BrokenResourceError` when the
      device is reset or its ring is found malformed, and
      :class:`ClosedResourceError` once the device is removed.
    - A chain popped before a reset is *stale*: putting it is accepted and
      dropped (the ring it came from no longer exists). The device waits for
      every stale chain to be put back (:meth:`drain`) before it acknowledges
      a reset, so no backend writes into card memory the card already reused.
    - :attr:`on_detach`, if set, is called (synchronously, with the new
      state) every time the ring goes away: a reset, NEEDS_RESET (a malformed
      ring found by any call) or removal. A backend that holds chains between
      calls gives them back there, whichever of its loops is running; a
      :meth:`get` on an IDLE queue waits without raising, so a reset between
      two ``get`` calls is otherwise not reported.
    - :attr:`on_kick`, if set, is called by :meth:`notify` (the card's
      doorbell, in the doorbell's callback) while the queue is live. A backend
      that serves the queue right there, with :meth:`poll`, returns True and
      no waiting :meth:`get` is woken; False wakes it as usual.
    """

    def __init__(
        self,
        owner: EndpointOwner,
        index: int,
        size: int,
        on_detach: Callable[[EndpointState], None] | None = None,
    ) -> None:
        self.index = index
        self.size = size
        self.on_detach = on_detach
        self.on_kick: Callable[[], bool] | None = None
        self._owner = owner
        self._queue: AnyDeviceQueue | None = None
        self._state = EndpointState.IDLE
        self._reason = ""
        self._generation = 0
        self._wake = asyncio.Event()  # doorbell or state change
        self._state_changed = asyncio.Event()
        self._inflight: dict[int, Chain] = {}  # id(chain) -> chain, current ring
        self._stale: dict[int, Chain] = {}  # id(chain) -> chain, from an old ring
        self._stale_empty = asyncio.Event()
        self._stale_empty.set()
        self._flush_handle: asyncio.Handle | None = None
        # counters (plain ints; exported by stats()). The card's doorbell is per
        # device (VopDevice.doorbells): per queue, what this queue made of them.
        self.wakeups = 0  # a get() waiting for a kick was woken and found work
        self.popped = 0  # chains popped from the avail ring
        self.interrupts = 0
        self.buffers = 0
        self.bytes_in = 0  # card -> host (readable bytes of completed chains)
        self.bytes_out = 0  # host -> card (written lengths)
        self.errors = 0
        self.dropped = 0

    # -- state, driven by the device -------------------------------------------
    @property
    def state(self) -> EndpointState:
        return self._state

    @property
    def queue(self) -> AnyDeviceQueue | None:
        return self._queue

    @property
    def in_flight(self) -> int:
        """Chains handed to the backend and not yet put back (current ring)."""
        return len(self._inflight)

    def _set_state(self, state: EndpointState, reason: str = "") -> None:
        self._state = state
        self._reason = reason
        self._generation += 1
        self._wake.set()
        self._state_changed.set()
        self._state_changed = asyncio.Event()

    def attach(self, queue: AnyDeviceQueue) -> None:
        """Serve ``queue`` (already validated and activated) from now on."""
        if self._state is EndpointState.CLOSED:
            raise ClosedResourceError(f"queue {self.index} is closed")
        self._retire_inflight()
        self._queue = queue
        self._set_state(EndpointState.LIVE)

    def detach(self, state: EndpointState, reason: str) -> None:
        """Drop the ring: IDLE (reset), BROKEN (NEEDS_RESET) or CLOSED (removed).

        Chains the backend still holds become stale; pending getters wake and raise.
        """
        if self._state is EndpointState.CLOSED:
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
            self._flush()  # what was completed before the reset is still published
        self._retire_inflight()
        self._queue = None
        self._set_state(state, reason)
        if self.on_detach is not None:
            self.on_detach(state)

    def _retire_inflight(self) -> None:
        if self._inflight:
            self._stale.update(self._inflight)
            self._inflight.clear()
            self._stale_empty.clear()

    async def drain(self) -> None:
        """Wait until every stale chain was put back (no timeout: the caller sets one)."""
        await self._stale_empty.wait()

    def notify(self) -> None:
        """The card rang this device's doorbell: serve it (:attr:`on_kick`) or wake a
        waiting :meth:`get`."""
        kick = self.on_kick
        if kick is not None and self._state is EndpointState.LIVE and kick():
            return
        self._wake.set()

    # -- consuming -----------------------------------------------------------
    def _raise_if_dead(self) -> None:
        if self._state is EndpointState.CLOSED:
            raise ClosedResourceError(f"queue {self.index} closed: {self._reason}")
        if self._state is EndpointState.BROKEN:
            raise BrokenResourceError(f"queue {self.index} broken: {self._reason}")

    def _check(self) -> AnyDeviceQueue:
        self._raise_if_dead()
        q = self._queue
        if q is None:
            raise WouldBlock(f"queue {self.index} is not live")
        return q

    def _pop(self, q: AnyDeviceQueue) -> Chain | None:
        try:
            chain = q.pop()
        except (RingError, QueueBroken) as e:
            self.errors += 1
            self._owner._ring_error(self.index, e)
            raise BrokenResourceError(f"queue {self.index}: {e}") from e
        if chain is not None:
            self.popped += 1
            self._inflight[id(chain)] = chain
            if trace.ON:
                trace.mark(trace.POP)
        return chain

    def get_nowait(self) -> Chain:
        """The next chain the card made available.

        Raises:
            WouldBlock: the ring is empty or not live yet.
            BrokenResourceError: the device needs a reset (or the ring just broke).
            ClosedResourceError: the device was removed.
        """
        q = self._check()
        chain = self._pop(q)
        if chain is None:
            raise WouldBlock(f"queue {self.index} is empty")
        return chain

    def poll(self) -> Chain | None:
        """The next chain, for a backend serving kicks from :attr:`on_kick`; None once
        the ring is empty and kicks are asked for again (the card rings for the next one).

        Raises:
            WouldBlock: the queue is not live.
            BrokenResourceError: the device needs a reset (or the ring just broke).
            ClosedResourceError: the device was removed.
        """
        q = self._check()
        chain = self._pop(q)
        if chain is None and q.enable_notifications():
            chain = self._pop(q)  # made available between the last look and the request
        return chain

    def _pop_many(self, q: AnyDeviceQueue) -> list[Chain]:
        try:
            chains = q.pop_many()
        except (RingError, QueueBroken) as e:
            self.errors += 1
            self._owner._ring_error(self.index, e)
            raise BrokenResourceError(f"queue {self.index}: {e}") from e
        if chains:
            self.popped += len(chains)
            inflight = self._inflight
            for chain in chains:
                inflight[id(chain)] = chain
            if trace.ON:
                for _ in chains:
                    trace.mark(trace.POP)
        return chains

    async def get(self) -> Chain:
        """Wait for the next chain.

        Waits (without polling) while the queue is not live yet; once a
        ``get`` is waiting on a live queue, a reset makes it raise.

        Raises:
            BrokenResourceError: the device was reset or broken while waiting,
                or is NEEDS_RESET now.
            ClosedResourceError: the device was removed.
        """
        chain: Chain = await self._get(self._pop)
        return chain

    async def get_many(self) -> list[Chain]:
        """Wait for chains; returns every chain available now (at least one, at most
        the queue size), in ring order: a backend serves a whole doorbell's batch in
        one pass of the loop instead of one ``await`` per chain.

        Raises: as :meth:`get`.
        """
        chains: list[Chain] = await self._get(self._pop_many)
        return chains

    async def _get(self, pop: Callable[[AnyDeviceQueue], _T | None]) -> _T:
        gen = self._generation
        waited_live = False
        woken = False
        while True:
            if self._state is EndpointState.IDLE and not waited_live:
                await self.wait_live()
                gen = self._generation
            if gen != self._generation:
                self._raise_if_dead()
                raise BrokenResourceError(f"queue {self.index} was reset: {self._reason}")
            q = self._check()
            waited_live = True
            got = pop(q)
            if got:  # a Chain, or a non-empty list of them
                self.wakeups += woken
                return got
            # Empty: ask for kicks, then re-check (vhost_enable_notify) so a
            # buffer made available in between is not left without a wake-up.
            self._wake.clear()
            try:
                again = q.enable_notifications()
            except MicError as e:  # pragma: no cover - enable only writes our own used ring
                self._owner._ring_error(self.index, e)
                raise BrokenResourceError(str(e)) from e
            if not again:
                if self._flush_handle is not None:
                    # Nothing more is waiting: publish what was completed now
                    # rather than one loop iteration later (coalesce only
                    # while work waits, never by waiting for it).
                    self.flush()
                await self._wake.wait()
                woken = True
            if self._queue is q and not q.broken:
                q.disable_notifications()

    async def wait_live(self) -> None:
        """Wait until the queue is live (DRIVER_OK, after any reset).

        Raises:
            ClosedResourceError: the device was removed.
        """
        while self._state is not EndpointState.LIVE:
            if self._state is EndpointState.CLOSED:
                raise ClosedResourceError(f"queue {self.index} closed: {self._reason}")
            await self._state_changed.wait()

    def chains(self) -> AsyncIterator[Chain]:
        """Every chain, forever, across resets; ends when the device is removed."""
        return self._across_resets(self.get)

    def batches(self) -> AsyncIterator[list[Chain]]:
        """:meth:`chains` a doorbell's batch at a time (:meth:`get_many`): a backend
        serves every ready chain in one pass of the loop, then publishes once."""
        return self._across_resets(self.get_many)

    async def _across_resets(self, get: Callable[[], Awaitable[_T]]) -> AsyncIterator[_T]:
        """What ``get`` returns, forever: a reset waits for the queue to be live
        again; the device's removal ends it."""
        while True:
            try:
                item = await get()
            except BrokenResourceError:
                try:
                    await self.wait_live()
                except ClosedResourceError:
                    return
                continue
            except ClosedResourceError:
                return
            yield item

    # -- completing ----------------------------------------------------------
    def put(self, chain: Chain, written_len: int) -> bool:
        """Complete ``chain`` with ``written_len`` bytes written into its writable part.

        Publication is deferred to the end of the current loop iteration (one
        ``used.idx`` store and at most one interrupt per burst); call
        :meth:`flush` to publish now. Returns False when the chain was stale
        (popped before a reset) and was dropped.

        Raises:
            LocalProtocolError: ``chain`` did not come from this endpoint, or
                ``written_len`` exceeds its writable size.
        """
        key = id(chain)
        if key in self._stale:
            del self._stale[key]
            self.dropped += 1
            if not self._stale:
                self._stale_empty.set()
            return False
        if key not in self._inflight:
            raise LocalProtocolError(f"chain {chain.head} is not in flight on queue {self.index}")
        if not 0 <= written_len <= chain.writable_len:
            raise LocalProtocolError(
                f"written_len {written_len} outside 0..{chain.writable_len} for chain {chain.head}"
            )
        del self._inflight[key]
        q = self._queue
        assert q is not None  # in-flight chains are retired whenever the queue goes
        try:
            q.add_used(chain.head, written_len)
        except QueueBroken as e:
            self.errors += 1
            self._owner._ring_error(self.index, e)
            return False
        if trace.ON:
            trace.mark(trace.PUSH)
        self.buffers += 1
        self.bytes_in += chain.readable_len
        self.bytes_out += written_len
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
        return True

    def flush(self) -> None:
        """Publish staged completions now (and interrupt the card if it asks)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._flush()

    def _flush(self) -> None:
        self._flush_handle = None
        q = self._queue
        if q is None or q.broken:
            return
        if q.publish_used():
            self.interrupts += 1
            if trace.ON:
                trace.mark(trace.INTERRUPT)
            self._owner._interrupt()
        self._owner._published(self.index, q.next_avail)

    def stats(self) -> dict[str, int | str]:
        """Counters as a plain dict (JSON-ready)."""
        return {
            "index": self.index,
            "size": self.size,
            "state": self._state.value,
            "wakeups": self.wakeups,
            "chains": self.popped,
            "interrupts": self.interrupts,
            "buffers": self.buffers,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "errors": self.errors,
            "dropped": self.dropped,
            "in_flight": len(self._inflight),
        }
