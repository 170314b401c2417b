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
from virtio.errors import BrokenResourceError, ClosedResourceError
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
        """Queue ``data`` for the card; False when the queue is over its bound (data kept)."""
        self._pending += data
        self._in_event.set()
        return len(self._pending) < self._max_pending

    async def write(self, data: bytes) -> None:
        """Queue ``data`` for the card (waits while too much is queued)."""
        while len(self._pending) >= self._max_pending:
            self._room_event.clear()
            await self._room_event.wait()
        self.write_nowait(data)

    async def rx_loop(self, q: QueueEndpoint) -> None:
        """Host -> card: fill the buffers the card posts on the port's receiveq."""
        while True:
            while not self._pending:
                self._in_event.clear()
                await self._in_event.wait()
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
            n = chain.write(self._pending)
            del self._pending[:n]
            self.bytes_to_card += n
            q.put(chain, n)
            if len(self._pending) < self._max_pending:
                self._room_event.set()
                if self.on_room is not None:
                    self.on_room()

    async def tx_loop(self, q: QueueEndpoint) -> None:
        """Card -> host: every chain on the port's transmitq is output.

        A chain is read :data:`TX_STEP` bytes at a time and the loop gets its
        turn after every :data:`TX_STEP` bytes (or chains' worth), so neither
        one big chain nor a stream of small ones holds it; one over the
        backend's ``max_chain`` is returned unread (the card's fault).
        """
        backend = self.backend
        budget = 0
        async for chain in q.chains():
            n = chain.readable_len
            if n > backend.max_chain:
                q.put(chain, 0)
                self.oversized += 1
                backend.card_fault(
                    "%s: port %d: transmit chain of %d bytes over the %d-byte limit dropped unread",
                    backend.name, self.id, n, backend.max_chain,
                )  # fmt: skip
            else:
                budget = await self._output_chain(chain, n, budget)
                q.put(chain, 0)
            budget += CHAIN_COST
            if budget >= TX_STEP:
                budget = 0
                await backend.pause()

    async def _output_chain(self, chain: Chain, n: int, budget: int) -> int:
        """Hand on the ``n`` readable bytes of ``chain`` piece by piece; the new budget."""
        if n <= TX_STEP:  # the common case (our driver sends 4 KiB): one copy, no slicing
            if n:
                data = chain.read()
                self.bytes_from_card += n
                self.on_output(data)
            return budget + n
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
