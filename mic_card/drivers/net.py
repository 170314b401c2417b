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
configured by :mod:`mic_card.drivers.net_tap`. Completions
are handled in future callbacks, no task per packet (as
:mod:`mic_card.drivers.console`); one publish and one kick per loop iteration
is :class:`mic_card.endpoint.DriverEndpoint`'s job.

The namespace has one owner, the host daemon: it creates it before the card
boots or the NIC is hot-added and deletes it when its net backend closes
(it outlives the card). The card only opens its TAP there; a namespace that
does not exist is a tap-mode failure (frames mode follows). The shell's
``ifconfig``/``ip``/``netstat`` text lives in :mod:`mic_card.shell.net`,
which imports this driver; this module never imports the shell.

Must not import ``mic_host``; ``transport.tap`` is loaded only on the tap path
(boot time). :class:`NetDevice` stays one class (~590 lines): receive,
transmit and the TAP bridge share the same slot pools, which the per-packet
path reads as plain attributes.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

from mic_card.drivers.net_params import (
    FRAMES_FEATURES,
    consistent,
    feature_names,
    merge_params,
    param_mac,
    plan,
)
from mic_card.drivers.net_tap import open_card_tap
from virtio import trace
from virtio.constants import NetFeature, NetHdrFlag
from virtio.errors import (
    BrokenResourceError,
    LocalProtocolError,
    MicError,
    RemoteProtocolError,
    ResourceError,
    WouldBlock,
)
from virtio.net import (
    DEVICE_FEATURES,
    ETH_HLEN,
    MAX_PACKET,
    NET_HDR,
    NET_HDR_SIZE,
    NUM_BUFFERS,
    NUM_BUFFERS_OFFSET,
    FrameError,
    check_header,
    complete_checksum,
    format_mac,
    guest_offloads,
    host_offloads,
    parse_config,
)
from virtio.split import gather_segments

if TYPE_CHECKING:
    from mic_card.bus import CardDevice
    from mic_card.endpoint import DriverEndpoint
    from transport.tap import Tap

__all__ = [
    "ERROR_REASONS",
    "FRAMES_FEATURES",
    "MRG_BUFFER",
    "NetDevice",
    "merge_params",
]

log = logging.getLogger(__name__)

#: One mergeable receive buffer (one descriptor). Linux sizes them from an
#: EWMA of packet sizes; a fixed 16 KiB keeps a 64 KiB segment at 5 buffers.
MRG_BUFFER = 16384
#: Transmit slots (card RAM the TAP is read into / frames are copied into).
TX_SLOTS = 64
#: Without MRG_RXBUF but with GUEST_TSO each buffer holds a whole 64 KiB
#: packet; post at most this many (Linux "big packets" also posts fewer).
MAX_BIG_BUFFERS = 64
#: Frames kept for an app that does not read (frames mode); more are dropped.
RX_QUEUE_MAX = 1024
#: Packets read from the TAP per readable event (then the loop runs again).
TAP_BATCH = 64
_VLAN = 4
_ALIGN = 64
_MIN_MTU = 68
_LOGGED = 20  # malformed packets logged per device (then only counted)

_NEEDS_CSUM = int(NetHdrFlag.NEEDS_CSUM)
#: drop reasons counted as errors (the rest as drops) by ``ifconfig``/``netstat``
ERROR_REASONS = frozenset({"runt", "bad_header", "offload", "oversize", "num_buffers"})


# --------------------------------------------------------------------------
# the driver


class _Pool:
    """One card-RAM block cut into equal slots, with precomputed views."""

    def __init__(self, dev: CardDevice, count: int, size: int, min_count: int) -> None:
        size = -(-size // _ALIGN) * _ALIGN
        while True:
            try:
                self.addr = dev.alloc(count * size, 4096)
                break
            except ResourceError:
                if count <= min_count:
                    raise
                count = max(min_count, count // 2)
        self.count = count
        self.size = size
        self.addrs = [self.addr + i * size for i in range(count)]
        block = dev.mem.view(self.addr, count * size, True)
        self.views = [block[i * size : (i + 1) * size] for i in range(count)]


class NetDevice:
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
        self.netns: str | None = str(entry["netns"]) if entry.get("netns") else None
        self.card_ip: str | None = str(entry["card_ip"]) if entry.get("card_ip") else None
        self.gateway: str | None = str(entry["gateway"]) if entry.get("gateway") else None
        self.requested_mode = str(entry.get("mode") or ("auto" if entry else "frames"))
        self.mode = "pending" if planned == "tap" else "frames"
        self.error = ""
        if problem is not None:
            self.error = f"tap mode impossible: {problem}; using frames mode"
            log.error("%s: %s", self.name, self.error)
        self.tap: Tap | None = None
        self._closed: BrokenResourceError | None = None
        self._link_event = asyncio.Event()
        self._rx_accepts = guest_offloads(f)
        self._tx_accepts = host_offloads(f)
        self._mrg = bool(f & NetFeature.MRG_RXBUF)
        self._rx_max = self.mtu + ETH_HLEN + _VLAN
        # counters
        self.rx_packets = self.rx_bytes = self.rx_gso = self.rx_largest = 0
        self.tx_packets = self.tx_bytes = self.tx_gso = self.tx_largest = 0
        self.rx_dropped: collections.Counter[str] = collections.Counter()
        self.tx_dropped: collections.Counter[str] = collections.Counter()
        self.config_changes = 0
        self._logged = 0
        # frames mode receive queue
        self.rx_queue_max = rx_queue_max
        self._rxq: collections.deque[bytes] = collections.deque()
        self._rx_ready = asyncio.Event()
        # queues and buffers
        self.rxq: DriverEndpoint = dev.endpoints[0]
        self.txq: DriverEndpoint = dev.endpoints[1]
        self._rx_parts: list[tuple[int, int]] = []
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
    def _rx_pool(self) -> _Pool:
        n = self.rxq.size
        if self._mrg:
            # §5.1.6.3.1: each mergeable buffer at least the header; one descriptor each.
            return _Pool(self.dev, n, MRG_BUFFER, 8)
        if self._rx_accepts.tso4 or self._rx_accepts.tso6:
            return _Pool(self.dev, min(n, MAX_BIG_BUFFERS), MAX_PACKET, 4)
        return _Pool(self.dev, n, NET_HDR_SIZE + self._rx_max, 8)

    def _tx_pool(self) -> _Pool:
        big = self._tx_accepts.tso4 or self._tx_accepts.tso6
        size = MAX_PACKET if big else NET_HDR_SIZE + self._rx_max
        return _Pool(self.dev, min(TX_SLOTS, self.txq.size), size, 4)

    @property
    def mac_str(self) -> str:
        return format_mac(self.mac)

    # -- receive ------------------------------------------------------------------
    def _post_rx(self, i: int) -> None:
        try:
            fut = self.rxq.submit_nowait((), self._rx_segs[i])
        except (WouldBlock, BrokenResourceError, LocalProtocolError) as e:
            # One descriptor per buffer and never more buffers than the ring
            # holds, so only a broken queue gets here (detach follows).
            self.rx_dropped["repost"] += 1
            log.debug("%s: receive buffer not posted: %s", self.name, e)
            return
        fut.add_done_callback(self._rx_cbs[i])

    def _on_rx(self, i: int, fut: asyncio.Future[int]) -> None:
        """One receive buffer completed (in used-ring order). Never raises."""
        if fut.cancelled() or fut.exception() is not None or self._closed is not None:
            return  # the endpoint failed: detach frees the pool
        n = fut.result()
        if self._rx_need:
            self._rx_parts.append((i, n))
            self._rx_need -= 1
            if not self._rx_need:
                parts, self._rx_parts = self._rx_parts, []
                self._deliver(parts)
            return
        if n < NET_HDR_SIZE:
            # §5.1.6.3.1: the header is always in the first buffer.
            self._rx_drop("runt", f"buffer of {n} B holds no header", [(i, n)])
            return
        if self._mrg:
            (nb,) = NUM_BUFFERS.unpack_from(self._rx.views[i], NUM_BUFFERS_OFFSET)
            if not 1 <= nb <= self._rx.count:
                self._rx_drop("num_buffers", f"num_buffers {nb}", [(i, n)])
                return
            if nb > 1:
                self._rx_parts = [(i, n)]
                self._rx_need = nb - 1
                return
        self._deliver([(i, n)])

    def _rx_drop(self, reason: str, why: str, parts: list[tuple[int, int]]) -> None:
        self.rx_dropped[reason] += 1
        if reason in ERROR_REASONS and self._logged < _LOGGED:
            self._logged += 1
            log.warning("%s: dropped a malformed packet from the host: %s", self.name, why)
        for j, _ in parts:
            self._post_rx(j)

    def _deliver(self, parts: list[tuple[int, int]]) -> None:
        views = self._rx.views
        i0, n0 = parts[0]
        first = views[i0]
        total = n0 if len(parts) == 1 else sum(n for _, n in parts)
        frame_len = total - NET_HDR_SIZE
        flags, gso_type = first[0], first[1]
        # Fast path for the common plain frame; everything else gets the full check
        # (virtio 1.2 §5.1.6.4.1: what the device may set).
        if flags or gso_type or not ETH_HLEN <= frame_len <= self._rx_max:
            hdr = NET_HDR.unpack_from(first)
            try:
                check_header(hdr, frame_len, self._rx_accepts, mtu=self.mtu, from_driver=False)
            except FrameError as e:
                self._rx_drop(e.reason, str(e), parts)
                return
            if gso_type:
                self.rx_gso += 1
        self.rx_packets += 1
        self.rx_bytes += frame_len
        if frame_len > self.rx_largest:
            self.rx_largest = frame_len
        fd = self._tap_fd
        if fd >= 0:
            try:
                if len(parts) == 1:
                    os.write(fd, first[:n0])
                else:
                    os.writev(fd, [views[j][:n] for j, n in parts])
                if trace.ON:
                    trace.mark(trace.CARD_TAP_OUT)
            except OSError as e:
                self.rx_dropped["tap_write"] += 1
                if self._logged < _LOGGED:
                    self._logged += 1
                    log.warning("%s: TAP refused a packet: %s", self.name, e)
        elif self.mode == "frames":
            self._queue_frame(parts, frame_len, flags)
        else:
            self.rx_dropped["not_ready"] += 1  # TAP still being set up
        for j, _ in parts:
            self._post_rx(j)

    def _queue_frame(self, parts: list[tuple[int, int]], frame_len: int, flags: int) -> None:
        if len(self._rxq) >= self.rx_queue_max:
            self.rx_dropped["queue_full"] += 1
            return
        views = self._rx.views
        i0, n0 = parts[0]
        segs = [views[i0][NET_HDR_SIZE:n0], *(views[j][:n] for j, n in parts[1:])]
        if flags & _NEEDS_CSUM:
            # Only when tap mode fell back to frames after GUEST_CSUM was acked:
            # finish the checksum as a NIC would (Linux skb_checksum_help).
            # One gather out of the ring; apps get immutable bytes (recv() -> bytes).
            _, _, _, _, start, offset, _ = NET_HDR.unpack_from(views[i0])
            buf = bytearray(frame_len)
            gather_segments(segs, memoryview(buf))
            complete_checksum(memoryview(buf), start, offset)
            frame = bytes(buf)
        elif len(segs) == 1:
            frame = bytes(segs[0])
        else:
            frame = b"".join(segs)
        self._rxq.append(frame)
        self._rx_ready.set()

    # -- transmit -------------------------------------------------------------------
    def _on_tx_done(self, slot: int, fut: asyncio.Future[int]) -> None:
        if not fut.cancelled():
            fut.exception()  # retrieved: a failed endpoint means detach follows
        if self._closed is not None:
            return
        self._tx_free.append(slot)
        self._tx_room.set()
        if not self._reading and self._tap_fd >= 0:
            self._resume_tap()

    def _submit_tx(self, slot: int, length: int) -> None:
        """Raises: WouldBlock, BrokenResourceError (the slot is still the caller's)."""
        fut = self.txq.submit_nowait(((self._tx.addrs[slot], length),), ())
        fut.add_done_callback(self._tx_cbs[slot])

    def _count_tx(self, frame_len: int, gso_type: int) -> None:
        self.tx_packets += 1
        self.tx_bytes += frame_len
        if gso_type:
            self.tx_gso += 1
        if frame_len > self.tx_largest:
            self.tx_largest = frame_len

    def send_nowait(
        self,
        frame: bytes | bytearray | memoryview,
        *,
        flags: int = 0,
        gso_type: int = 0,
        hdr_len: int = 0,
        gso_size: int = 0,
        csum_start: int = 0,
        csum_offset: int = 0,
    ) -> None:
        """Queue one Ethernet frame for the host (the header fields default to zero:
        a complete frame; set them for a partial checksum or a GSO segment when
        CSUM / HOST_TSO were negotiated).

        Raises:
            WouldBlock: no free transmit slot or ring room right now.
            LocalProtocolError: a runt, oversized frame or a header the host did
                not negotiate.
            BrokenResourceError: the device went away.
        """
        if self._closed is not None:
            raise BrokenResourceError(str(self._closed))
        n = len(frame)
        hdr = (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)
        try:
            check_header(hdr, n, self._tx_accepts, mtu=self.mtu, from_driver=True)
        except FrameError as e:
            raise LocalProtocolError(f"{self.name}: {e}") from e
        if n + NET_HDR_SIZE > self._tx.size:
            raise LocalProtocolError(f"{self.name}: frame of {n} B does not fit a transmit slot")
        if not self._tx_free or not self.txq.queue.num_free:
            raise WouldBlock(f"{self.name}: transmit ring full")
        slot = self._tx_free.pop()
        view = self._tx.views[slot]
        NET_HDR.pack_into(view, 0, *hdr)
        view[NET_HDR_SIZE : NET_HDR_SIZE + n] = frame
        try:
            self._submit_tx(slot, NET_HDR_SIZE + n)
        except (WouldBlock, BrokenResourceError):
            self._tx_free.append(slot)
            raise
        self._count_tx(n, gso_type)

    async def send(self, frame: bytes | bytearray | memoryview, **header: int) -> None:
        """Queue one Ethernet frame, waiting for a free transmit slot.

        Returns once the frame is on the ring (not when the host consumed it).

        Raises: as :meth:`send_nowait` (except WouldBlock).
        """
        while True:
            try:
                self.send_nowait(frame, **header)
                return
            except WouldBlock:
                self._tx_room.clear()
                await self._tx_room.wait()

    # -- frames mode receive -------------------------------------------------------
    def recv_nowait(self) -> bytes:
        """The next received Ethernet frame.

        Raises:
            WouldBlock: none queued.
            BrokenResourceError: the device went away and nothing is queued.
            LocalProtocolError: the NIC is bridged to a TAP (frames go there).
        """
        if self._rxq:
            frame = self._rxq.popleft()
            if not self._rxq:
                self._rx_ready.clear()
            return frame
        if self._closed is not None:
            raise BrokenResourceError(str(self._closed))
        if self.mode == "tap":
            raise LocalProtocolError(
                f"{self.name} is bridged to TAP {self.ifname} in namespace {self.netns}: "
                "receive there"
            )
        raise WouldBlock(f"{self.name}: no frame")

    async def recv(self) -> bytes:
        """Wait for the next received Ethernet frame.

        Raises:
            BrokenResourceError: the device went away and nothing is queued.
            LocalProtocolError: the NIC is bridged to a TAP.
        """
        while True:
            try:
                return self.recv_nowait()
            except WouldBlock:
                self._rx_ready.clear()
                await self._rx_ready.wait()

    async def frames(self) -> AsyncIterator[bytes]:
        """Every received frame until the device goes away."""
        while True:
            try:
                yield await self.recv()
            except BrokenResourceError:
                return

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

    def _resume_tap(self) -> None:
        if self._tap_fd >= 0 and not self._reading:
            asyncio.get_running_loop().add_reader(self._tap_fd, self._on_tap_readable)
            self._reading = True

    def _pause_tap(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self._tap_fd)
            self._reading = False

    def _on_tap_readable(self) -> None:
        """Frames the card's kernel sent: read each straight into a transmit slot."""
        fd = self._tap_fd
        free = self._tx_free
        q = self.txq.queue
        iov = self._tx_iov
        views = self._tx.views
        readv = os.readv
        for _ in range(TAP_BATCH):
            if not free or not q.num_free:
                self._pause_tap()  # resumed by the next transmit completion
                return
            slot = free.pop()
            try:
                n = readv(fd, iov[slot])
            except BlockingIOError:
                free.append(slot)
                return
            except OSError as e:
                free.append(slot)
                log.error("%s: TAP read failed: %s", self.name, e)
                self._pause_tap()
                return
            if trace.ON:
                trace.mark(trace.CARD_TAP_IN)
            if n < NET_HDR_SIZE + ETH_HLEN:
                free.append(slot)
                self.tx_dropped["runt"] += 1
                continue
            try:
                self._submit_tx(slot, n)
            except (WouldBlock, BrokenResourceError):
                free.append(slot)
                self.tx_dropped["ring"] += 1
                self._pause_tap()
                return
            self._count_tx(n - NET_HDR_SIZE, views[slot][1])

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
