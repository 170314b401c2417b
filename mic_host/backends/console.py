"""virtio-console backend, port 0 only (virtio 1.2 §5.3): the card's ``hvc0``.

Queue 0 is port 0's receiveq (host -> card: the card posts empty buffers the
host fills with input), queue 1 its transmitq (card -> host: output). Card
output is appended to a log file (``log_path``) and to an in-memory ring
buffer the host can read and wait on; :meth:`ConsoleBackend.write` queues
input for the card. No MULTIPORT, no pty yet (mpssd used a pty; a later
change adds it).

Must not import ``transport`` or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from mic_host.backends import BackendContext
from mic_host.endpoint import QueueEndpoint
from virtio.constants import DeviceType
from virtio.errors import BrokenResourceError, ClosedResourceError, ConfigError
from virtio.layouts import ConsoleConfig

__all__ = ["CONSOLE_QUEUE_SIZE", "ConsoleBackend"]

log = logging.getLogger(__name__)

CONSOLE_QUEUE_SIZE = 64
RX, TX = 0, 1


class ConsoleBackend:
    """Port 0 of a virtio console: card output to a log + ring buffer, input to the card.

    Options: ``name`` (default ``"console"``), ``log_path`` (append card
    output there), ``history`` (bytes kept in memory, default 64 KiB),
    ``cols``/``rows`` (config space), ``max_pending`` (input bytes queued
    before :meth:`write` waits).
    """

    device_type = int(DeviceType.CONSOLE)

    def __init__(
        self,
        *,
        name: str = "console",
        log_path: str | os.PathLike[str] | None = None,
        history: int = 64 * 1024,
        cols: int = 80,
        rows: int = 25,
        max_pending: int = 1 << 20,
        queue_size: int = CONSOLE_QUEUE_SIZE,
    ) -> None:
        if history <= 0 or max_pending <= 0:
            raise ConfigError(f"console {name}: history and max_pending must be positive")
        self.name = name
        self.cols = cols
        self.rows = rows
        self.queue_size = queue_size
        self.log_path = Path(log_path) if log_path is not None else None
        self._log: BinaryIO | None = None
        if self.log_path is not None:
            try:
                self._log = self.log_path.open("ab")
            except OSError as e:
                raise ConfigError(f"console {name}: cannot open log {self.log_path}: {e}") from e
        self._history = bytearray()
        self._history_max = history
        self._total_out = 0  # bytes ever received from the card
        self._out_event = asyncio.Event()
        self._pending = bytearray()
        self._max_pending = max_pending
        self._in_event = asyncio.Event()  # input queued
        self._room_event = asyncio.Event()  # pending drained below the limit
        self._room_event.set()
        self.bytes_from_card = 0
        self.bytes_to_card = 0

    # -- Backend -----------------------------------------------------------------
    def features(self) -> int:
        return 0

    def config_bytes(self) -> bytes:
        data: bytes = ConsoleConfig.build(
            {"cols": self.cols, "rows": self.rows, "max_nr_ports": 1, "emerg_wr": 0}
        )
        return data

    def queue_sizes(self) -> Sequence[int]:
        return (self.queue_size, self.queue_size)

    async def run(self, ctx: BackendContext) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._tx_loop(ctx.queues[TX]))
            tg.create_task(self._rx_loop(ctx.queues[RX]))

    async def aclose(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- card -> host --------------------------------------------------------------
    async def _tx_loop(self, q: QueueEndpoint) -> None:
        async for chain in q.chains():
            data = chain.read()
            q.put(chain, 0)
            self._output(data)

    def _output(self, data: bytes) -> None:
        if not data:
            return
        self.bytes_from_card += len(data)
        self._total_out += len(data)
        if self._log is not None:
            try:
                self._log.write(data)
                self._log.flush()
            except OSError as e:
                log.error("%s: console log write failed: %s", self.name, e)
        self._history += data
        if len(self._history) > self._history_max:
            del self._history[: len(self._history) - self._history_max]
        self._out_event.set()

    def output(self) -> bytes:
        """The last ``history`` bytes the card wrote."""
        return bytes(self._history)

    async def wait_output(self, needle: bytes) -> bytes:
        """Wait until ``needle`` appears in the history; return the history.

        Bound it with ``asyncio.timeout`` (the history keeps the last
        ``history`` bytes, so a needle longer than that never matches).
        """
        while needle not in self._history:
            self._out_event.clear()
            await self._out_event.wait()
        return bytes(self._history)

    # -- host -> card -------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        """Queue ``data`` as console input for the card (waits while too much is queued)."""
        while len(self._pending) >= self._max_pending:
            self._room_event.clear()
            await self._room_event.wait()
        self._pending += data
        self._in_event.set()

    async def _rx_loop(self, q: QueueEndpoint) -> None:
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

    def stats(self) -> dict[str, int]:
        return {
            "bytes_from_card": self.bytes_from_card,
            "bytes_to_card": self.bytes_to_card,
            "pending_input": len(self._pending),
        }
