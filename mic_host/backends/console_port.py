"""One port of the host's virtio console: the queue loops and their bounds.

Owns :class:`HostPort`, the host end of one console port (virtio 1.2 §5.3):
input queued for the card and written into the buffers it posts on the port's
receiveq, output read from the chains on its transmitq and handed on. And the
bounds on what the card can make it do (issue 14): a transmit chain is read
:data:`TX_STEP` bytes at a time with the loop getting its turn between pieces,
and one over the owner's ``max_chain`` (:data:`MAX_TX_CHAIN` by default) is
returned unread. The device-wide state (control protocol, log, pty) is the
owner's, :class:`mic_host.backends.console.ConsoleBackend`, seen here only as
:class:`PortOwner`.

Must not import the console backend module, ``transport`` or ``mic_card``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from mic_host.endpoint import QueueEndpoint
from virtio.errors import BrokenResourceError, ClosedResourceError, MicError
from virtio.split.chain import Chain, slice_segments

__all__ = ["CHAIN_COST", "MAX_TX_CHAIN", "TX_STEP", "HostPort", "PortOwner"]

#: The largest transmit chain the backend reads. A console never sends more in
#: one buffer: Linux's hvc path sends at most a page, ``write(2)`` on a port at
#: most 32 KiB (``port_fops_write``), ``splice(2)`` at most a pipe's worth (1 MiB
#: at the default ``pipe-max-size``); our card driver sends 4 KiB. A bigger
#: chain is the card's fault: returned used with 0 bytes, counted, not read.
MAX_TX_CHAIN = 1 << 20
#: A transmit chain is read and handed on this many bytes at a time, the loop
#: getting its turn between pieces (heartbeats, other cards).
TX_STEP = 64 << 10
#: What a chain costs on top of its bytes when pacing the loops (so a flood of
#: empty or tiny chains yields too).
CHAIN_COST = 1024


class PortOwner(Protocol):
    """What a port needs from its device (the console backend)."""

    @property
    def name(self) -> str: ...

    @property
    def max_chain(self) -> int:
        """The largest transmit chain read."""

    def card_fault(self, msg: str, *args: object) -> None:
        """Log a line the card caused (rate-limited per device)."""

    async def pause(self) -> None:
        """Let the loop run (and wait while output is held back) between pieces of work."""

    def held_back(self) -> bool:
        """Output is held back (:meth:`pause` would wait): chains are left to the loop."""


class HostPort:
    """The host end of one console port: input queued for the card, output handed on."""

    def __init__(
        self,
        backend: PortOwner,
        port_id: int,
        name: str | None,
        on_output: Callable[[bytes], None],
        *,
        max_pending: int,
    ) -> None:
        self.backend = backend
        self.id = port_id
        self.name = name
        self.console = port_id == 0
        self.on_output = on_output
        self.ready = False  # the card added it (PORT_READY 1)
        self.guest_open = False  # the card has it open (PORT_OPEN from the driver)
        self._open_changed = asyncio.Event()
        self._pending = bytearray()
        self._max_pending = max_pending
        self._in_event = asyncio.Event()
        self._room_event = asyncio.Event()
        self._room_event.set()
        self.on_room: Callable[[], None] | None = None
        self._txq: QueueEndpoint | None = None  # the transmitq, while tx_loop runs
        self._tx_parked = False  # tx_loop waits for a chain (the callback may serve)
        self._big: asyncio.Future[None] | None = None  # a big chain the callback popped
        self._rxq: QueueEndpoint | None = None  # the receiveq, while rx_loop runs
        self._rx_idle = False  # rx_loop waits for input (nothing is queued)
        self.bytes_from_card = 0
        self.bytes_to_card = 0
        self.oversized = 0  # transmit chains over MAX_TX_CHAIN (not read)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def set_guest_open(self, value: bool) -> None:
        self.guest_open = value
        self._open_changed.set()
        self._open_changed = asyncio.Event()

    async def wait_open(self) -> None:
        """Wait until the card has the port open (bound it with ``asyncio.timeout``)."""
        while not self.guest_open:
            await self._open_changed.wait()

    def write_nowait(self, data: bytes) -> bool:
        """Queue ``data`` for the card; False when the queue is over its bound (data kept).

        When the receive loop is idle (nothing was queued) the data goes into
        the card's buffers right here, and the card is interrupted at once:
        typed input reaches the card without waking a task first.
        """
        self._pending += data
        if self._rx_idle and self._rxq is not None:
            self._fill_nowait(self._rxq)
        if self._pending:
            self._in_event.set()
        return len(self._pending) < self._max_pending

    async def write(self, data: bytes) -> None:
        """Queue ``data`` for the card (waits while too much is queued)."""
        while len(self._pending) >= self._max_pending:
            self._room_event.clear()
            await self._room_event.wait()
        self.write_nowait(data)

    def _fill(self, q: QueueEndpoint, chain: Chain) -> None:
        n = chain.write(self._pending)
        del self._pending[:n]
        self.bytes_to_card += n
        q.put(chain, n)

    def _fill_nowait(self, q: QueueEndpoint) -> None:
        """Fill the buffers the card posted with what is queued, and publish now
        (nothing else is waiting); what does not fit is left to :meth:`rx_loop`."""
        filled = False
        while self._pending:
            try:
                chain = q.get_nowait()
            except MicError:  # empty, not live, broken: the loop deals with it
                break
            self._fill(q, chain)
            filled = True
        if filled:
            q.flush()
            self._room()

    def _room(self) -> None:
        if len(self._pending) < self._max_pending:
            self._room_event.set()
            if self.on_room is not None:
                self.on_room()

    async def rx_loop(self, q: QueueEndpoint) -> None:
        """Host -> card: fill the buffers the card posts on the port's receiveq."""
        self._rxq = q
        try:
            while True:
                while not self._pending:
                    self._in_event.clear()
                    self._rx_idle = True
                    try:
                        await self._in_event.wait()
                    finally:
                        self._rx_idle = False
                try:
                    chain = await q.get()
                except BrokenResourceError:
                    try:
                        await q.wait_live()  # input stays queued across a reset
                    except ClosedResourceError:
                        return
                    continue
                except ClosedResourceError:
                    return
                self._fill(q, chain)
                self._room()
        finally:
            self._rxq = None

    async def tx_loop(self, q: QueueEndpoint) -> None:
        """Card -> host: every chain on the port's transmitq is output.

        Chains are served in the doorbell's callback (:meth:`_on_kick`) while
        this loop is parked; the loop takes over when the callback leaves
        work (a budget's worth done, a big chain, the log behind). A chain is
        read :data:`TX_STEP` bytes at a time and the loop gets its turn after
        every :data:`TX_STEP` bytes (or chains' worth), so neither one big
        chain nor a stream of small ones holds it; one over the backend's
        ``max_chain`` is returned unread (the card's fault).
        """
        backend = self.backend
        budget = 0
        self._txq = q
        q.on_kick = self._on_kick
        self._tx_parked = True
        try:
            async for chain in q.chains():
                self._tx_parked = False
                big = self._big
                if big is not None:
                    await big  # a big chain the callback popped goes out first
                n = chain.readable_len
                if TX_STEP < n <= backend.max_chain:
                    budget = await self._output_chain(chain, n, budget)
                    q.put(chain, 0)
                    budget += CHAIN_COST
                else:
                    budget += self._transmit(q, chain)
                if budget >= TX_STEP:
                    budget = 0
                    await backend.pause()
                self._tx_parked = True
        finally:
            q.on_kick = None
            self._txq = None
            if self._big is not None:
                self._big.cancel()

    def _transmit(self, q: QueueEndpoint, chain: Chain) -> int:
        """Output a chain of at most :data:`TX_STEP` bytes (or drop one over
        ``max_chain``) and complete it; what it cost the budget."""
        backend = self.backend
        n = chain.readable_len
        if n > backend.max_chain:
            q.put(chain, 0)
            self.oversized += 1
            backend.card_fault(
                "%s: port %d: transmit chain of %d bytes over the %d-byte limit dropped unread",
                backend.name, self.id, n, backend.max_chain,
            )  # fmt: skip
            return CHAIN_COST
        try:
            if n:
                data = chain.read()
                self.bytes_from_card += n
                self.on_output(data)
        finally:
            q.put(chain, 0)
        return n + CHAIN_COST

    def _on_kick(self) -> bool:
        """The card rang: output what it sent right here, as an ISR would, when
        :meth:`tx_loop` is parked; True when the ring was drained (nobody to wake).

        At most :data:`TX_STEP` bytes' worth per ring (the next ring comes
        after a loop iteration: other cards run in between); the loop takes
        over when more is left, when a chain needs reading in pieces, or
        when the backend holds output back.
        """
        q = self._txq
        if q is None or not self._tx_parked or self._big is not None or self.backend.held_back():
            return False
        budget = 0
        served = False
        drained = False
        try:
            while budget < TX_STEP:
                chain = q.poll()
                if chain is None:
                    drained = True
                    break
                served = True
                n = chain.readable_len
                if TX_STEP < n <= self.backend.max_chain:
                    self._big = asyncio.ensure_future(self._output_big(q, chain, n))
                    break
                budget += self._transmit(q, chain)
        except MicError:  # not live, or the ring broke: the loop finds out
            drained = False
        except Exception as e:  # a bug in an output sink must not reach the doorbell
            backend = self.backend
            backend.card_fault("%s: port %d: output failed: %r", backend.name, self.id, e)
            drained = False
        if served:
            q.flush()  # nothing more is waiting: publish now
        return drained

    async def _output_big(self, q: QueueEndpoint, chain: Chain, n: int) -> None:
        """A chain over :data:`TX_STEP` the callback popped: out in pieces, then completed."""
        try:
            await self._output_chain(chain, n, 0)
            q.put(chain, 0)
        finally:
            self._big = None

    async def _output_chain(self, chain: Chain, n: int, budget: int) -> int:
        """Hand on the ``n`` readable bytes of ``chain`` piece by piece; the new budget."""
        off = 0
        while off < n:
            piece = b"".join(slice_segments(chain.readable, off, TX_STEP))
            off += len(piece)
            self.bytes_from_card += len(piece)
            self.on_output(piece)
            budget += len(piece)
            if budget >= TX_STEP:
                budget = 0
                await self.backend.pause()
        return budget
