"""The card half of virtio-rng: a driver that reads entropy from the host.

Follows Linux ``drivers/char/hw_random/virtio-rng.c``: post one
device-writable buffer (§5.4.6.1: never a device-readable one), wait until the
device used it, and take as many bytes as the device says it wrote (§5.4.6.1:
"the driver MUST examine the length written by the device"). The ring core
already clamps that length to the buffer; a device that writes nothing broke
§5.4.6.2, which is the host's fault and raised as such.

The card OS builds the driver with the live device once the probe is done
(features negotiated, queues set up, DRIVER_OK): ``RngDriver(device)``.
Card apps reach it as ``card.device("virtio4-0")``.
"""

from __future__ import annotations

from typing import Any

from mic_card.bus import CardDevice
from mic_vop_rng import VIRTIO_ID_RNG
from virtio.errors import BrokenResourceError, LocalProtocolError, RemoteProtocolError


class RngDriver:
    """virtio-rng on the card: ``await driver.read(n)`` returns ``n`` random bytes."""

    DEVICE_TYPE = VIRTIO_ID_RNG
    FEATURES = 0  # §5.4.3: no feature bits
    #: Largest buffer posted at once (the backend's default ``max_request``).
    BUFFER_SIZE = 4096
    #: Largest single read.
    MAX_READ = 1 << 20

    def __init__(self, dev: CardDevice) -> None:
        """Raises: RemoteProtocolError: the host offered no queue (the probe fails)."""
        if len(dev.endpoints) != 1:
            raise RemoteProtocolError(
                f"{dev.name}: virtio-rng has one queue, the host offered {len(dev.endpoints)}"
            )
        self._dev = dev
        self._requestq = dev.endpoints[0]
        self._gone: BrokenResourceError | None = None
        self.bytes_read = 0

    async def read(self, n: int) -> bytes:
        """``n`` random bytes from the host (the device may need several buffers).

        Raises:
            LocalProtocolError: ``n`` outside 0..MAX_READ.
            BrokenResourceError: the device was removed or reset meanwhile.
            RemoteProtocolError: the host returned a buffer with no bytes in it.
        """
        if not 0 <= n <= self.MAX_READ:
            raise LocalProtocolError(f"{self._dev.name}: read of {n} bytes (0..{self.MAX_READ})")
        out = bytearray()
        while len(out) < n:
            out += await self._request(min(n - len(out), self.BUFFER_SIZE))
        return bytes(out)

    async def _request(self, size: int) -> bytes:
        """Post one ``size``-byte buffer and return what the device wrote into it."""
        if self._gone is not None:
            raise BrokenResourceError(str(self._gone))
        dev = self._dev
        addr = dev.alloc(size)
        # On error or cancellation the endpoint calls release once the host can
        # no longer write into the buffer; on success the buffer is ours again.
        used = await self._requestq.submit((), [(addr, size)], release=lambda: dev.free(addr))
        try:
            if used == 0:
                raise RemoteProtocolError(f"{dev.name}: the host used a buffer without writing")
            self.bytes_read += used
            return bytes(dev.mem.view(addr, used))
        finally:
            dev.free(addr)

    # -- what the bus calls ---------------------------------------------------------
    def config_changed(self) -> None:
        """No config space (§5.4.4): nothing to do."""

    def detach(self, exc: BrokenResourceError) -> None:
        """The device is going away; pending reads already fail with ``exc``."""
        self._gone = exc

    def info(self) -> dict[str, Any]:
        """Shown in the card's device list (``driver_info``)."""
        return {"bytes_read": self.bytes_read, "queue": self._requestq.stats()}
