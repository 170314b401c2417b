"""A host TAP as one more port of an L2 switch: the host's leg on a userspace switch.

:class:`TapUplink` reads frames from its TAP into the switch and writes what
the switch delivers to it. It knows the switch only as a :class:`Forwarder`
(never imports :mod:`.switch`, which creates it).

Imports :mod:`.core` and ``transport.tap``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

from mic_host.backends.net.core import RX_BATCH
from mic_host.backends.net.frames import (
    NO_OFFLOADS,
    set_tap_offloads,
)
from transport.tap import (
    Tap,
    TapError,
)
from virtio.net import (
    ETH_HLEN,
    MAX_PACKET,
    NET_HDR,
    NET_HDR_SIZE,
    Offloads,
)

log = logging.getLogger(__name__)


log = logging.getLogger("mic_host.backends.net")


class Forwarder(Protocol):
    """What an uplink needs of its switch."""

    name: str

    def forward(
        self, ingress: Any, views: Sequence[memoryview], total: int, hdr: tuple[int, ...]
    ) -> None: ...


class TapUplink:
    """A host TAP attached to a switch as one more port (the host's leg)."""

    def __init__(
        self, switch: Forwarder, ifname: str, host_ip: str | None, netns: str | None, mtu: int
    ) -> None:
        self.switch = switch
        self.port_name = f"tap:{ifname}"
        self.host_ip = host_ip
        tap = Tap.open(ifname, netns=netns)
        try:
            set_tap_offloads(tap, NO_OFFLOADS)
            tap.configure_sync(host_ip, mtu=mtu)
        except BaseException:
            tap.close()
            raise
        self.tap = tap
        self._buf = bytearray(MAX_PACKET + 64)
        self._mv = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.rx_packets = 0
        self.tx_packets = 0
        self.drops = 0

    def start(self) -> None:
        if self._loop is None and not self.tap.closed:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.tap.fd, self._on_readable)

    def set_offloads(self, o: Offloads) -> None:
        if not self.tap.closed:
            try:
                set_tap_offloads(self.tap, o)
            except TapError as e:
                log.error("switch %s: %s", self.switch.name, e)

    def switch_in(self, views: Sequence[memoryview], total: int, hdr: tuple[int, ...]) -> None:
        try:
            os.writev(self.tap.fd, views)
        except OSError as e:
            self.drops += 1
            if e.errno not in (errno.EAGAIN, errno.EIO) and self.drops <= 5:
                log.warning("switch %s: write to %s: %s", self.switch.name, self.tap.name, e)
            return
        self.tx_packets += 1

    def _on_readable(self) -> None:
        mv = self._mv
        cap = len(mv)
        for _ in range(RX_BATCH):
            try:
                n = os.readv(self.tap.fd, [mv])
            except BlockingIOError:
                return
            except OSError as e:
                log.error("switch %s: read from %s: %s", self.switch.name, self.tap.name, e)
                self.close_reader()
                return
            if n > cap or n < NET_HDR_SIZE + ETH_HLEN:
                self.drops += 1
                continue
            self.rx_packets += 1
            self.switch.forward(self, [mv[:n]], n, NET_HDR.unpack_from(mv))

    def close_reader(self) -> None:
        if self._loop is not None and not self.tap.closed:
            self._loop.remove_reader(self.tap.fd)
        self._loop = None

    def close(self) -> None:
        self.close_reader()
        self.tap.close()
