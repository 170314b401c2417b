"""A card NIC on a host TAP (``backend = "tap"``, mpssd's model).

:class:`TapNetBackend` moves frames between a Linux TAP (``IFF_VNET_HDR``)
and card memory with ``os.readv``/``os.writev`` straight on the chains'
memoryviews: no copy in Python in either direction.

Imports :mod:`.core` and ``transport.tap`` (kernel plumbing only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from mic_host.backends.net.core import RX_BATCH, NetBackend
from mic_host.backends.net.frames import (
    IOV_MAX,
    NO_OFFLOADS,
    VLAN,
    address_of,
    read_hdr,
    set_tap_offloads,
)
from mic_host.endpoint import QueueEndpoint
from transport.tap import (
    TUN_F_TSO4,
    TUN_F_TSO6,
    Tap,
    TapError,
)
from virtio import trace
from virtio.net import (
    ETH_HLEN,
    MAX_PACKET,
    NET_HDR_SIZE,
)

log = logging.getLogger(__name__)


log = logging.getLogger("mic_host.backends.net")


# ---------------------------------------------------------------------------
# TAP


class TapNetBackend(NetBackend):
    """A card NIC on a host TAP (``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``), as mpssd's ``micN``.

    Options (besides :class:`NetBackend`'s): ``ifname`` (default the card
    name), ``host_ip`` (default ``172.31.{node}.254/24``, mpssd's; ``""``
    for none), ``card_ip`` (default ``172.31.{node}.1/24``; ``node``
    is the daemon's 1-based node id, so mic0 gets mpssd's 172.31.1.x), ``netns``
    (existing namespace the TAP is created in; default the daemon's).

    The TAP is created and configured (MTU, address, up) in the constructor,
    so a boot or attach fails right there with the kernel's reason.

    Data path: TX chains are written with one ``os.writev`` straight from card
    memory (header + frame; the TAP takes GSO and partial checksums). A full
    TAP (EAGAIN, which needs the socket's sndbuf exhausted) drops the frame
    and counts ``tap_full``: the transmitq never waits on the host. RX packets
    are read with one ``os.readv`` straight into the card's posted buffers;
    the TAP's offloads follow what the card negotiated (none before
    DRIVER_OK). Carrier is on while the link is up and the card's driver is
    live.

    Raises (constructor):
        TapPermissionError: no privilege (the message names the ``switch`` backend).
        TapError: bad interface name, name in use, ``netns`` missing, ``ip`` failed.
        ConfigError: a bad option, or the card namespace exists and is not ours.
    """

    kind = "tap"

    def __init__(
        self,
        *,
        name: str = "net",
        card: str = "mic0",
        node: int = 1,
        ifname: str | None = None,
        host_ip: str | None = None,
        card_ip: str | None = None,
        netns: str | None = None,
        **common: Any,
    ) -> None:
        node = int(node)
        if card_ip is None:
            card_ip = f"172.31.{node}.1/24"
        super().__init__(name=name, card=card, node=node, card_ip=card_ip, **common)
        self.ifname = ifname or card
        self.host_ip = host_ip if host_ip is not None else f"172.31.{node}.254/24"
        self.netns = netns
        self._reading = False
        self._rx_need = NET_HDR_SIZE + ETH_HLEN + VLAN + self.mtu
        self._tap_failed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        tap = Tap.open(self.ifname, netns=netns)
        try:
            set_tap_offloads(tap, NO_OFFLOADS)
            tap.set_carrier(False)
            tap.configure_sync(self.host_ip, mtu=self.mtu)
            self._acquire_card_netns()
        except BaseException:
            tap.close()
            raise
        self.tap = tap

    def _gateway(self) -> str | None:
        return address_of(self.host_ip)

    def _host_info(self) -> dict[str, Any]:
        return {
            "host_interface": self.ifname,
            "host_ip": self.host_ip,
            "netns": self.netns,
            "tap_offloads": self.tap.offloads,
        }

    def _close_host_side(self) -> None:
        self._rx_pause()
        self.tap.close()

    def _started(self) -> None:
        self._loop = asyncio.get_running_loop()

    def _session_started(self) -> None:
        try:
            set_tap_offloads(self.tap, self._to_card)
        except TapError as e:
            log.error("%s: %s; receiving without offloads", self.name, e)
            with contextlib.suppress(TapError):
                set_tap_offloads(self.tap, NO_OFFLOADS)
        tso = self.tap.offloads & (TUN_F_TSO4 | TUN_F_TSO6)
        # One packet must fit in what we hold before reading (§5.1.6.3.1).
        self._rx_need = MAX_PACKET if tso else NET_HDR_SIZE + ETH_HLEN + VLAN + self.mtu
        self._link_changed()

    def _session_ended(self) -> None:
        if self.tap.closed:
            return
        with contextlib.suppress(TapError):
            set_tap_offloads(self.tap, NO_OFFLOADS)
            self.tap.set_carrier(False)

    def _link_changed(self) -> None:
        if not self.tap.closed:
            with contextlib.suppress(TapError):
                self.tap.set_carrier(self.link_up and self._live)

    def _rx_resume(self) -> None:
        if not self._reading and not self._tap_failed and not self.tap.closed and self._loop:
            self._loop.add_reader(self.tap.fd, self._on_readable)
            self._reading = True

    def _rx_pause(self) -> None:
        if self._reading:
            self._reading = False
            if self._loop is not None and not self.tap.closed:
                self._loop.remove_reader(self.tap.fd)

    def _transmit(self, views: list[memoryview], total: int, hdr: tuple[int, ...]) -> bool:
        try:
            if len(views) <= IOV_MAX:
                os.writev(self.tap.fd, views)
            else:
                os.write(self.tap.fd, b"".join(views))
            if trace.ON:
                trace.mark(trace.HOST_TAP_OUT)
        except BlockingIOError:
            self.tx_drops["tap_full"] += 1
            return False
        except OSError as e:
            # EIO: the TAP is down; EINVAL: the kernel refused the header.
            self.tx_drops["tap_error"] += 1
            if self.tx_drops["tap_error"] <= 5:
                log.warning("%s: write to %s failed: %s", self.name, self.ifname, e)
            return False
        return True

    def _tx_drained(self, q: QueueEndpoint) -> None:
        # What we just wrote is often answered during the writev (the kernel's
        # ICMP echo reply, a TCP ACK): read the TAP now instead of one loop
        # iteration later (the reply's interrupt goes out first), then
        # publish the transmit completions, which the card reaps in that
        # interrupt without one of their own. Costs one read that may find
        # nothing per batch.
        if self._reading:
            self._on_readable()
        q.flush()

    def _on_readable(self) -> None:
        """TAP -> card, up to :data:`RX_BATCH` packets straight into the posted buffers."""
        if not self._live:  # a callback left from before a reset
            self._rx_pause()
            return
        fd = self.tap.fd
        need = self._rx_need
        for i in range(RX_BATCH):
            if not self._reserve(need):
                return
            iov, cap = self._rx_views()
            try:
                n = os.readv(fd, iov)
            except BlockingIOError:
                if i and self._rxq is not None:
                    # Drained: nothing more to coalesce with, interrupt now.
                    self._rxq.flush()
                return
            except OSError as e:
                self.rx_drops["tap_error"] += 1
                log.error("%s: read from %s failed: %s; RX stopped", self.name, self.ifname, e)
                self._tap_failed = True
                self._rx_pause()
                return
            if trace.ON:
                trace.mark(trace.HOST_TAP_IN)
            if n > cap:
                # tun returns the packet's full length when it did not fit.
                self.rx_drops["truncated"] += 1
                continue
            if n < NET_HDR_SIZE + ETH_HLEN:
                self.rx_drops["runt"] += 1
                continue
            hdr = read_hdr(iov)
            if (hdr[0] or hdr[1]) and not self._fix_rx_header(iov, n, hdr):
                continue
            self._commit(n)
            self._count_rx(n, hdr[1])
