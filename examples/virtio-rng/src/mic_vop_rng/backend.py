"""The host half of virtio-rng: a backend that fills the card's buffers with entropy.

The device (virtio 1.2 §5.4): device ID 4, one virtqueue (``requestq``), no
feature bits, no config space. The driver posts device-writable buffers; the
device "MUST place one or more random bytes into the buffer, but it MAY use
less than the entire buffer length" (§5.4.6.2). Like QEMU's ``virtio-rng``
(``max-bytes`` per ``period``), the backend bounds how much it hands out, so a
card asking in a loop cannot make the daemon spin: at most ``max_bytes`` per
``period`` seconds, at most ``max_request`` bytes per buffer.

Options (TOML ``options = { ... }`` or ``micctl attach mic0 rng --opt key=value``):
``queue_size`` (power of two, 1..256, default 64), ``max_bytes`` (default
1 MiB), ``period`` (seconds, default 1.0), ``max_request`` (default 4096).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from mic_host.backends import BackendContext
from mic_vop_rng import VIRTIO_ID_RNG
from virtio.errors import ConfigError
from virtio.split import Chain


class RngBackend:
    """A virtio-rng device serving ``os.urandom`` (a :class:`mic_host.backends.Backend`)."""

    device_type = VIRTIO_ID_RNG

    def __init__(
        self,
        *,
        name: str = "rng",
        queue_size: int = 64,
        max_bytes: int = 1 << 20,
        period: float = 1.0,
        max_request: int = 4096,
    ) -> None:
        """Raises: ConfigError: an option out of range (the message names it)."""
        self.name = name
        self.queue_size = _int(name, "queue_size", queue_size, 1, 256)
        if self.queue_size & (self.queue_size - 1):
            raise ConfigError(f"rng {name}: queue_size {queue_size} is not a power of two")
        self.max_bytes = _int(name, "max_bytes", max_bytes, 1, 1 << 30)
        self.max_request = _int(name, "max_request", max_request, 1, 1 << 20)
        if isinstance(period, bool) or not isinstance(period, int | float) or period <= 0:
            raise ConfigError(f"rng {name}: period {period!r} is not a positive number of seconds")
        self.period = float(period)
        self._left = 0  # bytes left in the current period
        self._period_end = 0.0
        self.bytes_served = 0
        self.bad_requests = 0

    # -- what VOP puts on the device page -----------------------------------------
    def features(self) -> int:
        return 0  # §5.4.3: no feature bits

    def config_bytes(self) -> bytes:
        return b""  # §5.4.4: no config space

    def queue_sizes(self) -> Sequence[int]:
        return (self.queue_size,)  # §5.4.2: requestq

    # -- serving -------------------------------------------------------------------
    async def run(self, ctx: BackendContext) -> None:
        """Fill every buffer the card posts, until the device is removed.

        ``chains()`` waits across resets; a chain popped before a reset is
        accepted by ``put`` and dropped (its ring no longer exists).
        """
        requestq = ctx.queues[0]
        async for chain in requestq.chains():
            requestq.put(chain, await self._fill(chain, ctx))

    async def _fill(self, chain: Chain, ctx: BackendContext) -> int:
        """Write random bytes into ``chain``; returns how many (0 for a bad request)."""
        if chain.readable_len:
            # §5.4.6.1: the driver MUST NOT post device-readable buffers. The
            # card's fault: answer with nothing, log once (never per request).
            self.bad_requests += 1
            if self.bad_requests == 1:
                ctx.log.warning("%s: the card posted a device-readable buffer; ignored", self.name)
            return 0
        n = await self._budget(min(chain.writable_len, self.max_request))
        return chain.write(os.urandom(n))

    async def _budget(self, want: int) -> int:
        """Up to ``want`` bytes within ``max_bytes`` per ``period`` (waits when spent)."""
        loop = asyncio.get_running_loop()
        if self._left == 0 and want:
            await asyncio.sleep(max(0.0, self._period_end - loop.time()))
        if loop.time() >= self._period_end:
            self._left = self.max_bytes
            self._period_end = loop.time() + self.period
        n = min(want, self._left)
        self._left -= n
        self.bytes_served += n
        return n

    async def aclose(self) -> None:
        """Nothing to release (no files, no threads)."""


def _int(name: str, key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"rng {name}: {key} {value!r} is not an integer in {low}..{high}")
    return value
