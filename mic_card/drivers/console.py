"""virtio-console driver for the card, port 0 (virtio 1.2 §5.3): ``hvc0``.

Queue 0 (receiveq) always has empty buffers posted for the host to fill;
completed ones are appended to an input buffer in order and re-posted at
once. Queue 1 (transmitq) carries :meth:`ConsoleDevice.write`. The device is
an async byte stream: ``await read()`` / ``async for chunk in console``.

Must not import ``transport`` or ``mic_host``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from mic_card.endpoint import DriverEndpoint
from virtio.errors import BrokenResourceError, WouldBlock

if TYPE_CHECKING:
    from mic_card.bus import CardDevice

__all__ = ["ConsoleDevice"]

RX_BUFFER = 512
TX_CHUNK = 4096


class ConsoleDevice:
    """Port 0 of a virtio console on the card."""

    FEATURES: ClassVar[int] = 0

    def __init__(self, dev: CardDevice, *, rx_buffers: int = 16) -> None:
        self.dev = dev
        self.name = dev.name
        self.rx: DriverEndpoint = dev.endpoints[0]
        self.tx: DriverEndpoint = dev.endpoints[1]
        self._data = bytearray()
        self._data_event = asyncio.Event()
        self._closed: BrokenResourceError | None = None
        self._tx_lock = asyncio.Lock()
        self.bytes_in = 0
        self.bytes_out = 0
        for _ in range(min(rx_buffers, self.rx.size)):
            self._post(dev.alloc(RX_BUFFER, 64))

    # -- receive -------------------------------------------------------------------
    def _post(self, addr: int) -> None:
        try:
            fut = self.rx.submit_nowait([], [(addr, RX_BUFFER)])
        except (WouldBlock, BrokenResourceError) as e:
            self.dev.free(addr)
            if isinstance(e, BrokenResourceError):
                self.detach(e)
            return
        fut.add_done_callback(lambda f: self._on_rx(addr, f))

    def _on_rx(self, addr: int, fut: asyncio.Future[int]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            # The endpoint failed: the host no longer touches the buffer.
            self.dev.free(addr)
            exc = fut.exception() if not fut.cancelled() else None
            self.detach(
                exc if isinstance(exc, BrokenResourceError) else BrokenResourceError("closed")
            )
            return
        n = fut.result()
        if n:
            self._data += self.dev.mem.view(addr, n)
            self.bytes_in += n
            self._data_event.set()
        if self._closed is None:
            self._post(addr)
        else:
            self.dev.free(addr)

    async def read(self, max_bytes: int = -1) -> bytes:
        """Bytes the host sent (at least one; at most ``max_bytes`` if > 0).

        Raises:
            BrokenResourceError: the device went away and nothing is buffered.
        """
        while not self._data:
            if self._closed is not None:
                raise BrokenResourceError(str(self._closed))
            self._data_event.clear()
            await self._data_event.wait()
        n = len(self._data) if max_bytes < 0 else min(max_bytes, len(self._data))
        out = bytes(self._data[:n])
        del self._data[:n]
        return out

    async def readuntil(self, sep: bytes = b"\n") -> bytes:
        """Bytes up to and including ``sep``."""
        while sep not in self._data:
            if self._closed is not None:
                raise BrokenResourceError(str(self._closed))
            self._data_event.clear()
            await self._data_event.wait()
        i = self._data.index(sep) + len(sep)
        out = bytes(self._data[:i])
        del self._data[:i]
        return out

    def __aiter__(self) -> ConsoleDevice:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.read()
        except BrokenResourceError:
            raise StopAsyncIteration from None

    # -- transmit -------------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        """Send ``data`` to the host (in order; returns once the host consumed it).

        Raises:
            BrokenResourceError: the device went away.
            ResourceError: card RAM exhausted.
        """
        async with self._tx_lock:
            for i in range(0, len(data), TX_CHUNK):
                chunk = data[i : i + TX_CHUNK]
                if self._closed is not None:
                    raise BrokenResourceError(str(self._closed))
                addr = self.dev.alloc(len(chunk), 64)
                self.dev.mem.view(addr, len(chunk), True)[:] = chunk
                await self.tx.submit([(addr, len(chunk))], [], release=self._freer(addr))
                self.dev.free(addr)
                self.bytes_out += len(chunk)

    def _freer(self, addr: int) -> Callable[[], None]:
        def release() -> None:
            self.dev.free(addr)

        return release

    # -- Driver --------------------------------------------------------------------
    def config_changed(self) -> None:
        pass  # port 0 only: no resize handling yet

    def detach(self, exc: BrokenResourceError) -> None:
        if self._closed is None:
            self._closed = exc
        self._data_event.set()
