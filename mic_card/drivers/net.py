"""virtio-net driver for the card (virtio 1.2 §5.1): ``eth0``, ``eth1``...

Owns the card end of one virtio-net device: the receive buffers it keeps
posted on receiveq (queue 0), the transmit slots it sends from on transmitq
(queue 1), the reassembly and checking of every packet the host writes, the
link status, and where frames go on the card:

- **tap mode** (the card process is privileged): the driver opens TAP
  ``ifname`` inside the network namespace ``netns`` (``IFF_VNET_HDR``, the
  12-byte header in front of each frame), gives it the virtio MAC, the card
  address, MTU and default route. Frames move between the TAP and card RAM
  with ``os.readv``/``os.writev`` straight into/out of the ring buffers, the
  header included, so GSO segments and partial checksums travel untouched
  (Linux ``drivers/net/tun.c`` speaks the same header). Any Linux program run
  in the namespace (``ip netns exec mic0 ping ...``) is a card application.
- **frames mode** (unprivileged, or asked for): card apps call
  :meth:`NetDevice.send` / :meth:`NetDevice.recv` with plain Ethernet frames;
  GUEST_CSUM/GUEST_TSO are not acked, so what arrives is a complete frame.

The mode comes from the boot parameters (``bus.params["net"]``, an entry per
NIC matched by MAC: :mod:`mic_card.drivers.net_params`); the TAP is opened and
configured by :mod:`mic_card.drivers.net_tap`. Completions are handled in
the interrupt itself, no future or task per packet; one publish and one kick
per loop iteration is :class:`mic_card.endpoint.DriverEndpoint`'s job.

The namespace has one owner, the host daemon: it creates it before the card
boots or the NIC is hot-added and deletes it when its net backend closes
(it outlives the card). The card only opens its TAP there; a namespace that
does not exist is a tap-mode failure (frames mode follows). The shell's
``ifconfig``/``ip``/``netstat`` text lives in :mod:`mic_card.shell.net`,
which imports this driver; this module never imports the shell.

Must not import ``mic_host``; ``transport.tap`` is loaded only on the tap path
(boot time). :class:`NetDevice` is one object assembled from a receive half
(:mod:`mic_card.drivers.net_rx`) and a transmit half
(:mod:`mic_card.drivers.net_tx`) that share the same slot pools, which the
per-packet path reads as plain attributes (:mod:`mic_card.drivers.net_base`);
this module holds setup, the link, the TAP's life, detach and reporting.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from typing import TYPE_CHECKING, Any, ClassVar

from mic_card.drivers.net_base import (
    ERROR_REASONS,
    MAX_BIG_BUFFERS,
    MRG_BIG_BUFFERS,
    MRG_BUFFER,
    RX_QUEUE_MAX,
    TX_SLOTS,
    SlotPool,
)
from mic_card.drivers.net_params import (
    FRAMES_FEATURES,
    consistent,
    feature_names,
    merge_params,
    param_mac,
    plan,
)
from mic_card.drivers.net_rx import NetRx
from mic_card.drivers.net_tap import open_card_tap
from mic_card.drivers.net_tx import NetTx
from virtio.constants import NetFeature
from virtio.errors import (
    BrokenResourceError,
    MicError,
    RemoteProtocolError,
    ResourceError,
)
from virtio.net import (
    DEVICE_FEATURES,
    ETH_HLEN,
    MAX_PACKET,
    NET_HDR_SIZE,
    format_mac,
    guest_offloads,
    host_offloads,
    parse_config,
)

if TYPE_CHECKING:
    from mic_card.bus import CardDevice

__all__ = [
    "ERROR_REASONS",
    "FRAMES_FEATURES",
    "MRG_BIG_BUFFERS",
    "MRG_BUFFER",
    "NetDevice",
    "merge_params",
]

log = logging.getLogger(__name__)

_VLAN = 4
_MIN_MTU = 68


class NetDevice(NetRx, NetTx):
    """A virtio-net NIC on the card (see the module docstring for the two modes).

    Attributes: ``name`` (``eth0``), ``mac`` (bytes), ``mac_str``, ``mtu``,
    ``link_up``, ``mode`` (``"tap"``, ``"frames"``, or ``"pending"`` while the
    TAP is being set up), ``ifname``/``netns``/``card_ip``/``gateway`` (from
    the boot parameters), ``tap`` (the open TAP in tap mode).
    """

    FEATURES: ClassVar[int] = int(DEVICE_FEATURES)

    @classmethod
    def supported_features(cls, dev: CardDevice) -> int:
        """The bits to ack for ``dev`` (called by the bus before FEATURES_OK).

        Tap mode: every offload we support; frames mode: no receive offloads
        (GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN), so apps get complete frames.
        Bits whose prerequisites the host did not offer are left out (§5.1.3.1).

        Raises:
            RemoteProtocolError: the config space is too short.
        """
        _, mode, _ = plan(dev)
        bits = int(DEVICE_FEATURES) if mode == "tap" else FRAMES_FEATURES
        return consistent(bits & dev.offered)

    def __init__(self, dev: CardDevice, *, rx_queue_max: int = RX_QUEUE_MAX) -> None:
        if len(dev.endpoints) < 2:
            raise RemoteProtocolError(
                f"{dev.name}: virtio-net needs 2 queues, got {len(dev.endpoints)}", reason="config"
            )
        self.dev = dev
        self.name = dev.name
        self.features = dev.features
        f = self.features
        cfg = parse_config(dev.read_config())
        entry, planned, problem = plan(dev)
        entry = entry or {}
        self.params = entry
        self.mac = cfg.mac if f & NetFeature.MAC else param_mac(entry, dev.name)
        self.mtu = (
            cfg.mtu if f & NetFeature.MTU and cfg.mtu >= _MIN_MTU else int(entry.get("mtu") or 1500)
        )
        self.link_up = cfg.link_up if f & NetFeature.STATUS else True
        self.ifname = str(entry.get("ifname") or dev.name)
        self.netns = str(entry["netns"]) if entry.get("netns") else None
        self.card_ip: str | None = str(entry["card_ip"]) if entry.get("card_ip") else None
        self.gateway: str | None = str(entry["gateway"]) if entry.get("gateway") else None
        self.requested_mode = str(entry.get("mode") or ("auto" if entry else "frames"))
        self.mode = "pending" if planned == "tap" else "frames"
        self.error = ""
        if problem is not None:
            self.error = f"tap mode impossible: {problem}; using frames mode"
            log.error("%s: %s", self.name, self.error)
        self.tap = None
        self._closed = None
        self._link_event = asyncio.Event()
        self._rx_accepts = guest_offloads(f)
        self._tx_accepts = host_offloads(f)
        self._mrg = bool(f & NetFeature.MRG_RXBUF)
        self._rx_max = self.mtu + ETH_HLEN + _VLAN
        # counters
        self.rx_packets = self.rx_bytes = self.rx_gso = self.rx_largest = 0
        self.tx_packets = self.tx_bytes = self.tx_gso = self.tx_largest = 0
        self.rx_dropped = collections.Counter()
        self.tx_dropped = collections.Counter()
        self.config_changes = 0
        self._logged = 0
        # frames mode receive queue
        self.rx_queue_max = rx_queue_max
        self._rxq = collections.deque()
        self._rx_ready = asyncio.Event()
        # queues and buffers
        self.rxq = dev.endpoints[0]
        self.txq = dev.endpoints[1]
        self._rx_parts = []
        self._rx_need = 0
        self._tx_room = asyncio.Event()
        self._tap_fd = -1
        self._reading = False
        self._setup_task: asyncio.Task[None] | None = None
        self._rx = self._rx_pool()
        try:
            self._tx = self._tx_pool()
        except ResourceError:
            dev.free(self._rx.addr)
            raise
        self._rx_segs = [[(a, self._rx.size)] for a in self._rx.addrs]
        self._rx_cbs = [functools.partial(self._on_rx, i) for i in range(self._rx.count)]
        self._tx_free = list(range(self._tx.count - 1, -1, -1))
        self._tx_iov = [[v] for v in self._tx.views]
        self._tx_cbs = [functools.partial(self._on_tx_done, i) for i in range(self._tx.count)]
        for i in range(self._rx.count):
            self._post_rx(i)
        self._tx_start()
        if planned == "tap":
            self._setup_task = asyncio.get_running_loop().create_task(
                self._setup_tap(), name=f"{self.name}-tap"
            )
            self._setup_task.add_done_callback(self._setup_done)
        log.info(
            "%s: virtio-net %s mtu %d link %s, %s mode, %d rx buffers of %d B",
            self.name,
            self.mac_str,
            self.mtu,
            "up" if self.link_up else "down",
            planned,
            self._rx.count,
            self._rx.size,
        )

    # -- buffers ------------------------------------------------------------------
    def _rx_pool(self) -> SlotPool:
        n = self.rxq.size
        big = self._rx_accepts.tso4 or self._rx_accepts.tso6
        if self._mrg and big:
            # Whole 64 KiB segments arrive (tap mode): one buffer per packet, so
            # one descriptor, one completion and one repost per packet instead
            # of five (docs/net.md "Performance").
            return SlotPool(self.dev, min(n, MRG_BIG_BUFFERS), MAX_PACKET, 8)
        if self._mrg:
            # §5.1.6.3.1: each mergeable buffer at least the header; one descriptor each.
            return SlotPool(self.dev, n, MRG_BUFFER, 8)
        if big:
            return SlotPool(self.dev, min(n, MAX_BIG_BUFFERS), MAX_PACKET, 4)
        return SlotPool(self.dev, n, NET_HDR_SIZE + self._rx_max, 8)

    def _tx_pool(self) -> SlotPool:
        big = self._tx_accepts.tso4 or self._tx_accepts.tso6
        size = MAX_PACKET if big else NET_HDR_SIZE + self._rx_max
        return SlotPool(self.dev, min(TX_SLOTS, self.txq.size), size, 4)

    @property
    def mac_str(self) -> str:
        return format_mac(self.mac)

    # -- link -----------------------------------------------------------------------
    async def wait_link(self, up: bool = True) -> None:
        """Wait until the link status is ``up``. Bound it with ``asyncio.timeout``.

        Raises:
            BrokenResourceError: the device went away.
        """
        while self.link_up != up:
            if self._closed is not None:
                raise BrokenResourceError(str(self._closed))
            await self._link_event.wait()

    def _signal_link(self) -> None:
        self._link_event.set()
        self._link_event = asyncio.Event()

    def config_changed(self) -> None:
        """The host changed the config space: re-read the link status (§5.1.4)."""
        self.config_changes += 1
        try:
            cfg = parse_config(self.dev.read_config())
        except RemoteProtocolError as e:
            log.error("%s: config space unreadable: %s", self.name, e)
            return
        up = cfg.link_up if self.features & NetFeature.STATUS else True
        if up != self.link_up:
            self.link_up = up
            log.info("%s: link %s", self.name, "up" if up else "down")
            self._carrier()
            self._signal_link()

    def _carrier(self) -> None:
        if self.tap is not None and not self.tap.closed:
            try:
                self.tap.set_carrier(self.link_up)
            except MicError as e:
                log.warning("%s: carrier not changed: %s", self.name, e)

    # -- tap mode ---------------------------------------------------------------------
    async def _setup_tap(self) -> None:
        ns = self.netns or self.name
        self.netns = ns
        o = self._tx_accepts  # what the host takes from us = what we take from the kernel
        try:
            tap = await open_card_tap(
                self.ifname, ns, mac=self.mac_str, offloads=o, link_up=self.link_up,
                address=self.card_ip, mtu=self.mtu, gateway=self.gateway,
            )  # fmt: skip
        except (MicError, OSError) as e:  # TapError is a ConfigError
            self.error = f"tap mode failed: {e}; using frames mode"
            log.error("%s: %s", self.name, self.error)
            if self._closed is None:
                self.mode = "frames"
            return
        if self._closed is not None:  # detached while the last step ran
            tap.close()
            return
        self.tap = tap
        self._carrier()  # a link change while the TAP was being set up
        self.mode = "tap"
        self._tap_fd = tap.fd
        self._resume_tap()
        log.info(
            "%s: bridged to TAP %s in namespace %s (%s)",
            self.name,
            self.ifname,
            ns,
            self.card_ip or "no address",
        )

    def _setup_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: TAP setup crashed: %r", self.name, task.exception())

    def _close_tap(self) -> None:
        if self._tap_fd >= 0:
            self._pause_tap()
            self._tap_fd = -1
        if self.tap is not None:
            self.tap.close()

    async def wait_closed(self) -> None:
        """After a detach: wait until a TAP setup that was running has ended (the
        TAP is closed then). The namespace is the daemon's: it stays."""
        if self._setup_task is not None:
            await asyncio.gather(self._setup_task, return_exceptions=True)

    # -- Driver -------------------------------------------------------------------------
    def detach(self, exc: BrokenResourceError) -> None:
        """The device went away: close the TAP (the namespace stays: the daemon's),
        free card RAM, fail every waiter with ``exc``."""
        if self._closed is not None:
            return
        self._closed = exc
        self._tx_stop()
        if self._setup_task is not None and not self._setup_task.done():
            self._setup_task.cancel()  # its handler closes the TAP
        else:
            self._close_tap()
        # The endpoints failed before this call: the host no longer touches the pools.
        self._rx_parts = []
        self._rx_need = 0
        for pool in (self._rx, self._tx):
            self.dev.free(pool.addr)
            pool.views = []  # no views into card RAM outlive the device
        self._tx_iov = []
        self._rx_ready.set()
        self._tx_room.set()
        self._signal_link()
        log.info("%s: detached (%s)", self.name, exc)

    # -- reporting ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._closed is None

    def stats(self) -> dict[str, Any]:
        """Counters (JSON-ready)."""
        return {
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "rx_gso_packets": self.rx_gso,
            "rx_largest": self.rx_largest,
            "rx_dropped": dict(self.rx_dropped),
            "rx_queued": len(self._rxq),
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "tx_gso_packets": self.tx_gso,
            "tx_largest": self.tx_largest,
            "tx_dropped": dict(self.tx_dropped),
            "rx_buffers": self._rx.count if self._closed is None else 0,
            "rx_buffer_size": self._rx.size,
            "tx_slots": self._tx.count,
            "tx_slots_free": len(self._tx_free),
            "config_changes": self.config_changes,
        }

    def info(self) -> dict[str, Any]:
        """What ``ifconfig``/``ip addr`` show, plus features and counters (JSON-ready)."""
        o_rx, o_tx = self._rx_accepts, self._tx_accepts
        return {
            "name": self.name,
            "mode": self.mode,
            "requested_mode": self.requested_mode,
            "mac": self.mac_str,
            "ifname": self.ifname,
            "netns": self.netns if self.mode != "frames" else None,
            "card_ip": self.card_ip,
            "gateway": self.gateway,
            "mtu": self.mtu,
            "link": "up" if self.link_up else "down",
            "running": self._closed is None,
            "ready": self._closed is None and self.mode != "pending",
            "error": self.error,
            "features": feature_names(self.features),
            "offloads": {
                "rx": [k for k in ("csum", "tso4", "tso6", "ecn") if getattr(o_rx, k)],
                "tx": [k for k in ("csum", "tso4", "tso6", "ecn") if getattr(o_tx, k)],
            },
            "mrg_rxbuf": self._mrg,
            "stats": self.stats(),
        }
