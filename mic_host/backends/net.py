"""virtio-net device backends (virtio 1.2 §5.1): a host TAP per card NIC, or a userspace L2 switch.

Owns the device side of a card NIC's rings: queue 0 is the receiveq (host ->
card, the card posts writable buffers), queue 1 the transmitq (card -> host).
Every frame on either ring is the 12-byte VERSION_1 header followed by an
Ethernet frame, so GSO (64 KiB TSO segments) and partial checksums travel as
one chain; the offer is :data:`virtio.net.DEVICE_FEATURES`.

- :class:`NetBackend` is the common device core: config space and link
  status, the transmitq loop (header checks against what the card negotiated,
  bad frames dropped and counted by reason, never an exception), the receiveq
  buffer accounting (chains held between packets, ``num_buffers`` for
  MRG_RXBUF §5.1.6.4, no busy loop when the card posts no buffers), the card
  network namespace bookkeeping, counters and :meth:`~NetBackend.info`.
- :class:`TapNetBackend` (``backend = "tap"``, mpssd's model) moves frames
  between a Linux TAP (``IFF_VNET_HDR``) and card memory with
  ``os.readv``/``os.writev`` straight on the chains' memoryviews: no copy in
  Python in either direction.
- :class:`SwitchNetBackend` (``backend = "switch"``) is one port of an
  :class:`L2Switch` living in the daemon (shared by name between cards, MAC
  learning, optional host TAP uplink); it needs no privileges. A frame is
  copied once per destination (card A's memory into card B's), and offloads a
  receiver did not negotiate are resolved (partial checksums completed in
  software, GSO dropped and counted).

Must not import ``mic_card``; uses ``transport.tap`` for the kernel plumbing
only (the backend registry itself stays transport-free).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from mic_host.backends import BackendContext
from mic_host.endpoint import EndpointState, QueueEndpoint
from transport.tap import (
    TUN_F_TSO4,
    TUN_F_TSO6,
    Tap,
    TapError,
    delete_netns,
    delete_netns_sync,
    netns_exists,
)
from virtio.constants import DeviceType, NetFeature, NetHdrFlag
from virtio.errors import (
    ConfigError,
    LocalProtocolError,
    MicError,
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
    Offloads,
    build_config,
    check_header,
    complete_checksum,
    format_mac,
    guest_offloads,
    host_offloads,
    is_multicast,
    parse_mac,
    random_mac,
)
from virtio.split import Chain, gather_segments, scatter_segments

__all__ = [
    "L2Switch",
    "NetBackend",
    "SwitchNetBackend",
    "TapNetBackend",
    "create_net_backend",
    "switches",
]

log = logging.getLogger(__name__)

NET_QUEUE_SIZE = 256
#: Packets read from the TAP per wake-up before going back to the loop (the
#: used ring is published once per loop iteration by the endpoint).
RX_BATCH = 64
#: TX chains handled per wake-up before yielding to other cards.
TX_BATCH = 128
#: Frames a switch port keeps for a card that has no RX buffers posted.
SWITCH_BACKLOG = 256
_RXQ, _TXQ = 0, 1
_NEEDS_CSUM = int(NetHdrFlag.NEEDS_CSUM)
_VLAN = 4
_MAC_HDR = NET_HDR_SIZE + 12  # header + destination + source MAC
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_NO_OFFLOADS = Offloads()
_CARD_MODES = ("auto", "tap", "frames")
#: drop reasons, card -> host (always present in ``info()["counters"]["drops"]["tx"]``)
_TX_REASONS = ("runt", "bad_header", "offload", "oversize", "link_down", "tap_full", "tap_error")
#: drop reasons, host -> card
_RX_REASONS = (
    "runt",
    "bad_header",
    "offload",
    "oversize",
    "link_down",
    "not_ready",
    "truncated",
    "bad_buffer",
    "backlog",
    "tap_error",
)


def _read_hdr(views: Sequence[memoryview]) -> tuple[int, int, int, int, int, int, int]:
    """The 12-byte header at the start of a scatter list (it may span descriptors)."""
    v0 = views[0]
    if len(v0) >= NET_HDR_SIZE:
        hdr: tuple[int, int, int, int, int, int, int] = NET_HDR.unpack_from(v0)
        return hdr
    buf = bytearray(NET_HDR_SIZE)
    gather_segments(views, memoryview(buf))
    hdr = NET_HDR.unpack_from(buf)
    return hdr


def _scatter(src: Sequence[memoryview], dst: Sequence[memoryview], total: int) -> int:
    """Copy ``total`` bytes from one scatter list into another in one pass (no
    joins); returns bytes copied (fewer when either list ends first)."""
    if len(src) == 1:
        return scatter_segments(dst, src[0][:total])
    di = doff = done = 0
    nd = len(dst)
    for seg in src:
        sn = min(len(seg), total - done)
        soff = 0
        while soff < sn:
            if di == nd:
                return done
            d = dst[di]
            take = min(sn - soff, len(d) - doff)
            d[doff : doff + take] = seg[soff : soff + take]
            soff += take
            done += take
            doff += take
            if doff == len(d):
                di += 1
                doff = 0
        if done == total:
            break
    return done


def _set_num_buffers(chain: Chain, n: int) -> None:
    """§5.1.6.4: the device sets ``num_buffers`` in the first buffer's header
    (a TAP's read does not write it)."""
    w0 = chain.writable[0]
    if len(w0) >= NET_HDR_SIZE:
        NUM_BUFFERS.pack_into(w0, NUM_BUFFERS_OFFSET, n)
    else:
        chain.write(NUM_BUFFERS.pack(n), NUM_BUFFERS_OFFSET)


def _addr(cidr: str | None) -> str | None:
    return cidr.split("/", 1)[0] if cidr else None


def _set_tap_offloads(tap: Tap, o: Offloads) -> None:
    tap.set_offloads(csum=o.csum, tso4=o.tso4, tso6=o.tso6, ecn=o.ecn)


# ---------------------------------------------------------------------------
# the device core


class NetBackend:
    """The device core of a card NIC; subclasses say where frames go and come from.

    Common options: ``name`` (host device name), ``card``/``node``/
    ``state_dir`` (given by the daemon), ``mac`` (``aa:bb:..``; default
    ``random_mac(f"{card}/{name}")``), ``mtu`` (68..65535, default 1500),
    ``card_ip``, ``card_netns`` (namespace the card puts its TAP in; default
    the card name), ``card_mode`` (``auto``/``tap``/``frames``). Both queues
    have :data:`NET_QUEUE_SIZE` entries.

    Counters are plain ints (``tx_drops``/``rx_drops`` map a reason to a count;
    ``tx`` is card -> host, ``rx`` host -> card, as the card's ``ifconfig`` sees it).

    Raises (constructor):
        ConfigError: a bad option, or the card namespace exists and is not ours.
    """

    device_type = int(DeviceType.NET)
    kind = "net"

    def __init__(
        self,
        *,
        name: str = "net",
        card: str = "mic0",
        node: int = 1,
        state_dir: str | os.PathLike[str] | None = None,
        mac: str | bytes | None = None,
        mtu: int = 1500,
        card_ip: str | None = None,
        card_netns: str | None = None,
        card_mode: str = "auto",
    ) -> None:
        self.name = name
        self.card = card
        self.node = int(node)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.mtu = int(mtu)
        if not 68 <= self.mtu <= 65535:
            raise ConfigError(f"net {name}: mtu {mtu} outside 68..65535")
        if card_mode not in _CARD_MODES:
            raise ConfigError(f"net {name}: card_mode {card_mode!r} not one of {_CARD_MODES}")
        self.card_mode = card_mode
        if mac is None:
            self.mac = random_mac(f"{card}/{name}".encode())
        elif isinstance(mac, bytes | bytearray):
            self.mac = bytes(mac)
        else:
            try:
                self.mac = parse_mac(mac)
            except LocalProtocolError as e:
                raise ConfigError(f"net {name}: {e}") from e
        if len(self.mac) != 6 or is_multicast(self.mac):
            raise ConfigError(f"net {name}: MAC {format_mac(self.mac)} is not a unicast address")
        self.card_ip = card_ip
        self.card_netns = card_netns if card_netns is not None else card
        self.link_up = True
        self._ctx: BackendContext | None = None
        self._rxq: QueueEndpoint | None = None
        self._txq: QueueEndpoint | None = None
        self._netns_claimed = False
        self._closed = False
        # session: from the first chain after DRIVER_OK to the next reset
        self._live = False
        self._features = 0
        self._mrg = False
        self._from_card = _NO_OFFLOADS  # what we accept on the transmitq
        self._to_card = _NO_OFFLOADS  # what the card accepts on the receiveq
        # RX buffers popped and not used yet (kept for the next packet)
        self._held: collections.deque[Chain] = collections.deque()
        self._held_cap = 0
        self._starved: asyncio.Event | None = None
        # counters
        self.rx_packets = 0
        self.rx_bytes = 0
        self.tx_packets = 0
        self.tx_bytes = 0
        self.rx_gso = 0
        self.tx_gso = 0
        self.max_packet = 0
        self.rx_no_buffers = 0
        self.sessions = 0
        self.tx_drops: dict[str, int] = dict.fromkeys(_TX_REASONS, 0)  # card -> host
        self.rx_drops: dict[str, int] = dict.fromkeys(_RX_REASONS, 0)  # host -> card

    # -- Backend ---------------------------------------------------------------
    def features(self) -> int:
        return int(DEVICE_FEATURES)

    def config_bytes(self) -> bytes:
        return build_config(self.mac, link_up=self.link_up, mtu=self.mtu)

    def queue_sizes(self) -> Sequence[int]:
        return (NET_QUEUE_SIZE, NET_QUEUE_SIZE)

    async def run(self, ctx: BackendContext) -> None:
        """Serve the receiveq and transmitq until the device is removed (never
        raises for anything the card wrote)."""
        self._ctx = ctx
        self._rxq = ctx.queues[_RXQ]
        self._txq = ctx.queues[_TXQ]
        self._starved = asyncio.Event()
        for q in (self._rxq, self._txq):
            q.on_detach = self._on_detach
        self._started()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._tx_loop(self._txq), name=f"{self.name}-tx")
                tg.create_task(self._rx_loop(self._rxq), name=f"{self.name}-rx")
        finally:
            self._end_session()

    async def aclose(self) -> None:
        """Release the host side (subclasses), then delete the card's network
        namespace if it is still there (left by the card) and forget it.

        Raises nothing for a namespace that cannot be deleted (logged).
        """
        if self._closed:
            return
        self._closed = True
        self._end_session()
        self._close_host_side()
        if self._netns_claimed:
            self._netns_claimed = False
            try:
                await delete_netns(self.card_netns)
            except TapError as e:
                log.warning("%s: cannot delete namespace %s: %s", self.name, self.card_netns, e)
                return
            path = self._netns_file()
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()

    # -- hooks for subclasses ----------------------------------------------------
    def _started(self) -> None:
        """``run`` started (on the loop)."""

    def _session_started(self) -> None:
        """The card finished negotiation and the queues are live."""

    def _session_ended(self) -> None:
        """The card reset the device (or it went away)."""

    def _rx_resume(self) -> None:
        """RX buffers are available again: start filling them."""

    def _rx_pause(self) -> None:
        """No RX buffers: stop producing packets until the card posts some."""

    def _transmit(self, views: list[memoryview], total: int, hdr: tuple[int, ...]) -> bool:
        """Send one checked frame (header + Ethernet frame) from the card; False if dropped."""
        raise NotImplementedError

    def _close_host_side(self) -> None:
        """Close the TAP / leave the switch."""

    def _host_info(self) -> dict[str, Any]:
        return {}

    # -- the card's network namespace --------------------------------------------
    def _netns_file(self) -> Path | None:
        if self.state_dir is None:
            return None
        return self.state_dir / f"{self.card}-{self.name}.netns"

    def _claim_card_netns(self) -> None:
        """Make sure the card can create ``card_netns``: delete one a crashed card
        left (recorded in ``STATE_DIR/<card>-<device>.netns``), refuse a foreign one.

        Raises:
            ConfigError: the namespace exists and is not recorded as ours, or
                the stale one cannot be deleted.
        """
        if self.card_mode == "frames" or not self.card_netns:
            return
        ns = self.card_netns
        path = self._netns_file()
        recorded = None
        if path is not None:
            with contextlib.suppress(OSError):
                recorded = path.read_text().strip() or None
        if netns_exists(ns):
            if recorded != ns:
                raise ConfigError(
                    f"network namespace {ns!r} already exists (not created by this daemon): "
                    "remove it or set card_netns"
                )
            log.warning("%s: deleting namespace %s left by a previous boot", self.name, ns)
            delete_netns_sync(ns)
        if path is not None:
            try:
                path.write_text(ns + "\n")
            except OSError as e:
                raise ConfigError(f"net {self.name}: cannot write {path}: {e.strerror}") from e
        self._netns_claimed = True

    # -- sessions ------------------------------------------------------------------
    def _begin_session(self) -> None:
        ctx = self._ctx
        assert ctx is not None
        f = ctx.features
        self._features = f
        self._mrg = bool(f & NetFeature.MRG_RXBUF)
        self._from_card = host_offloads(f)
        self._to_card = guest_offloads(f)
        self._live = True
        self.sessions += 1
        self._session_started()

    def _end_session(self) -> None:
        """Forget the negotiated state and give every held RX chain back (the
        device waits for them before acknowledging a reset)."""
        if self._live:
            self._live = False
            self._session_ended()
        self._rx_pause()
        q = self._rxq
        while self._held:
            chain = self._held.popleft()
            if q is not None:
                with contextlib.suppress(MicError):
                    q.put(chain, 0)
        self._held_cap = 0
        if self._starved is not None:
            self._starved.set()

    def _on_detach(self, state: EndpointState) -> None:
        """The rings went away (reset, NEEDS_RESET, removal): end the session now,
        so held RX chains go back before the device acknowledges the reset."""
        self._end_session()

    # -- transmitq: card -> host ------------------------------------------------------
    async def _tx_loop(self, q: QueueEndpoint) -> None:
        async for chain in q.chains():
            if not self._live:
                self._begin_session()
            self._tx_one(q, chain)
            n = 1
            while n < TX_BATCH:
                try:
                    chain = q.get_nowait()
                except MicError:  # empty, or gone (on_detach ended the session)
                    break
                self._tx_one(q, chain)
                n += 1
            if n >= TX_BATCH:
                await asyncio.sleep(0)  # let other cards and the publisher run

    def _tx_one(self, q: QueueEndpoint, chain: Chain) -> None:
        """Check one TX chain (§5.1.6.2) and hand it on; never raises for the card's input."""
        total = chain.readable_len
        views = chain.readable
        if total < NET_HDR_SIZE:
            self.tx_drops["runt"] += 1
        else:
            hdr = _read_hdr(views)
            frame_len = total - NET_HDR_SIZE
            try:
                check_header(hdr, frame_len, self._from_card, mtu=self.mtu, from_driver=True)
            except FrameError as e:
                self.tx_drops[e.reason] = self.tx_drops.get(e.reason, 0) + 1
            else:
                if not self.link_up:
                    self.tx_drops["link_down"] += 1
                elif self._transmit(views, total, hdr):
                    self.tx_packets += 1
                    self.tx_bytes += frame_len
                    if hdr[1]:
                        self.tx_gso += 1
                    if frame_len > self.max_packet:
                        self.max_packet = frame_len
        q.put(chain, 0)

    # -- receiveq: host -> card ---------------------------------------------------------
    async def _rx_loop(self, q: QueueEndpoint) -> None:
        starved = self._starved
        assert starved is not None
        # Only back in get() when we ran out of buffers (or before the first
        # one): it asks for a kick and re-checks, then sleeps.
        async for chain in q.chains():
            if not self._live:
                self._begin_session()
            self._hold(q, chain)
            starved.clear()
            self._rx_resume()
            await starved.wait()

    def _hold(self, q: QueueEndpoint, chain: Chain) -> None:
        if chain.writable_len < NET_HDR_SIZE:
            # No room for a header: give it back empty (the driver counts a runt).
            self.rx_drops["bad_buffer"] += 1
            q.put(chain, 0)
            return
        self._held.append(chain)
        self._held_cap += chain.writable_len

    def _starve(self) -> None:
        self.rx_no_buffers += 1
        self._rx_pause()
        if self._starved is not None:
            self._starved.set()

    def _reserve(self, need: int) -> bool:
        """Hold RX chains for ``need`` bytes (MRG_RXBUF) or one chain (without).

        False when the card has not posted enough: production pauses until the
        receiveq is kicked (the RX loop waits in ``get()``). With every
        buffer of the ring held, what we have must do (the packet may not fit
        and is then dropped as truncated).
        """
        q = self._rxq
        assert q is not None
        held = self._held
        if self._mrg:
            while self._held_cap < need:
                if len(held) >= q.size or len(held) >= _IOV_MAX:
                    return True
                if not self._pop_rx(q):
                    return False
            return True
        while not held:
            if not self._pop_rx(q):
                return False
        return True

    def _pop_rx(self, q: QueueEndpoint) -> bool:
        try:
            chain = q.get_nowait()
        except WouldBlock:
            self._starve()
            return False
        except MicError:  # broken or closed: on_detach ended the session
            return False
        self._hold(q, chain)
        return True

    def _rx_views(self) -> tuple[list[memoryview], int]:
        """Writable views of the held chains a packet may go into (one chain
        without MRG_RXBUF) and their total size. Call after :meth:`_reserve`."""
        held = self._held
        if not self._mrg:
            c = held[0]
            return c.writable, c.writable_len
        iov = [v for c in held for v in c.writable]
        if len(iov) > _IOV_MAX:
            iov = iov[:_IOV_MAX]
            return iov, sum(len(v) for v in iov)
        return iov, self._held_cap

    def _commit(self, n: int) -> None:
        """``n`` bytes were written into the held chains from the front: set
        num_buffers and complete each chain with its share (§5.1.6.4)."""
        q = self._rxq
        assert q is not None
        held = self._held
        first = held.popleft()
        wl = first.writable_len
        self._held_cap -= wl
        if n <= wl or not self._mrg:
            _set_num_buffers(first, 1)
            q.put(first, min(n, wl))
            return
        used = [(first, wl)]
        left = n - wl
        while left > 0:
            c = held.popleft()
            cl = c.writable_len
            self._held_cap -= cl
            take = cl if cl < left else left
            used.append((c, take))
            left -= take
        _set_num_buffers(first, len(used))
        for c, take in used:
            q.put(c, take)

    def _fix_rx_header(self, views: list[memoryview], n: int, hdr: tuple[int, ...]) -> bool:
        """Make a header acceptable to the card (§5.1.6.4): False to drop the packet.

        GSO the card did not negotiate is dropped (``offload``); a partial
        checksum is completed in software and ``flags`` cleared for a card
        without GUEST_CSUM (which must see flags 0, DATA_VALID included).
        """
        flags, gso_type, _hl, _gs, csum_start, csum_offset, _nb = hdr
        acc = self._to_card
        if gso_type and not acc.accepts(gso_type, 0):
            self.rx_drops["offload"] += 1
            return False
        if flags and not acc.csum:
            if flags & _NEEDS_CSUM:
                frame_len = n - NET_HDR_SIZE
                if csum_start + csum_offset + 2 > frame_len:
                    self.rx_drops["bad_header"] += 1
                    return False
                v0 = views[0]
                whole = len(v0) >= n
                # In place when the first buffer holds the packet; else one copy out.
                mv = v0[NET_HDR_SIZE:n] if whole else memoryview(bytearray(frame_len))
                if not whole:
                    gather_segments(views, mv, NET_HDR_SIZE)
                try:
                    complete_checksum(mv, csum_start, csum_offset)
                except LocalProtocolError:
                    self.rx_drops["bad_header"] += 1
                    return False
                if not whole:
                    where = csum_start + csum_offset
                    scatter_segments(views, mv[where : where + 2], NET_HDR_SIZE + where)
            scatter_segments(views, b"\0")  # flags
        return True

    def _count_rx(self, n: int, gso: int) -> None:
        frame_len = n - NET_HDR_SIZE
        self.rx_packets += 1
        self.rx_bytes += frame_len
        if gso:
            self.rx_gso += 1
        if frame_len > self.max_packet:
            self.max_packet = frame_len

    # -- control -------------------------------------------------------------------------
    async def set_link(self, up: bool) -> None:
        """Flip VIRTIO_NET_S_LINK_UP in the config space (config-change handshake)
        and the host side's carrier.

        Raises:
            MicTimeoutError: the card did not acknowledge the config change.
            LocalProtocolError: the device was removed.
        """
        self.link_up = bool(up)
        self._link_changed()
        if self._ctx is not None:
            await self._ctx.update_config(self.config_bytes())

    def _link_changed(self) -> None:
        """Carrier follows the link (subclasses)."""

    def _gateway(self) -> str | None:
        return None

    def card_params(self) -> dict[str, Any]:
        """What the card driver needs (``boot_params["net"]`` entry, matched by MAC)."""
        return {
            "mac": format_mac(self.mac),
            "card_ip": self.card_ip,
            "gateway": self._gateway(),
            "netns": self.card_netns,
            "mode": self.card_mode,
            "mtu": self.mtu,
            "ifname": "eth0",
        }

    def stats(self) -> dict[str, Any]:
        """Counters (JSON-ready): ``rx`` is host -> card, ``tx`` card -> host;
        ``drops`` by direction and reason, ``rx_dropped``/``tx_dropped`` their sums."""
        return {
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "rx_dropped": sum(self.rx_drops.values()),
            "tx_dropped": sum(self.tx_drops.values()),
            "gso_packets": self.rx_gso + self.tx_gso,
            "rx_gso_packets": self.rx_gso,
            "tx_gso_packets": self.tx_gso,
            "max_packet": self.max_packet,
            "rx_no_buffers": self.rx_no_buffers,
            "drops": {"rx": dict(self.rx_drops), "tx": dict(self.tx_drops)},
        }

    def info(self) -> dict[str, Any]:
        """A JSON-ready description for ``micctl net``."""

        def offl(o: Offloads) -> dict[str, bool]:
            return {"csum": o.csum, "tso4": o.tso4, "tso6": o.tso6, "ecn": o.ecn}

        out: dict[str, Any] = {
            "backend": self.kind,
            "card": self.card,
            "mac": format_mac(self.mac),
            "mtu": self.mtu,
            "link": "up" if self.link_up else "down",
            "card_ip": self.card_ip,
            "card_netns": self.card_netns,
            "card_mode": self.card_mode,
            "negotiated": self._live,
            "features": self._features,
            # negotiated, by name: csum/tso4/tso6/ecn (card -> host), guest_* (host -> card)
            "offloads": sorted(
                [k for k, v in offl(self._from_card).items() if v]
                + [f"guest_{k}" for k, v in offl(self._to_card).items() if v]
                + (["mrg_rxbuf"] if self._mrg else [])
            ),
            "offloads_to_card": offl(self._to_card),
            "offloads_from_card": offl(self._from_card),
            "counters": self.stats(),
        }
        out.update(self._host_info())
        return out


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
        self._rx_need = NET_HDR_SIZE + ETH_HLEN + _VLAN + self.mtu
        self._tap_failed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        tap = Tap.open(self.ifname, netns=netns)
        try:
            _set_tap_offloads(tap, _NO_OFFLOADS)
            tap.set_carrier(False)
            tap.configure_sync(self.host_ip, mtu=self.mtu)
            self._claim_card_netns()
        except BaseException:
            tap.close()
            raise
        self.tap = tap

    def _gateway(self) -> str | None:
        return _addr(self.host_ip)

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
            _set_tap_offloads(self.tap, self._to_card)
        except TapError as e:
            log.error("%s: %s; receiving without offloads", self.name, e)
            with contextlib.suppress(TapError):
                _set_tap_offloads(self.tap, _NO_OFFLOADS)
        tso = self.tap.offloads & (TUN_F_TSO4 | TUN_F_TSO6)
        # One packet must fit in what we hold before reading (§5.1.6.3.1).
        self._rx_need = MAX_PACKET if tso else NET_HDR_SIZE + ETH_HLEN + _VLAN + self.mtu
        self._link_changed()

    def _session_ended(self) -> None:
        if self.tap.closed:
            return
        with contextlib.suppress(TapError):
            _set_tap_offloads(self.tap, _NO_OFFLOADS)
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
            if len(views) <= _IOV_MAX:
                os.writev(self.tap.fd, views)
            else:
                os.write(self.tap.fd, b"".join(views))
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

    def _on_readable(self) -> None:
        """TAP -> card, up to :data:`RX_BATCH` packets straight into the posted buffers."""
        if not self._live:  # a callback left from before a reset
            self._rx_pause()
            return
        fd = self.tap.fd
        need = self._rx_need
        for _ in range(RX_BATCH):
            if not self._reserve(need):
                return
            iov, cap = self._rx_views()
            try:
                n = os.readv(fd, iov)
            except BlockingIOError:
                return
            except OSError as e:
                self.rx_drops["tap_error"] += 1
                log.error("%s: read from %s failed: %s; RX stopped", self.name, self.ifname, e)
                self._tap_failed = True
                self._rx_pause()
                return
            if n > cap:
                # tun returns the packet's full length when it did not fit.
                self.rx_drops["truncated"] += 1
                continue
            if n < NET_HDR_SIZE + ETH_HLEN:
                self.rx_drops["runt"] += 1
                continue
            hdr = _read_hdr(iov)
            if (hdr[0] or hdr[1]) and not self._fix_rx_header(iov, n, hdr):
                continue
            self._commit(n)
            self._count_rx(n, hdr[1])


# ---------------------------------------------------------------------------
# the userspace switch


class SwitchPort(Protocol):
    """One port of an :class:`L2Switch` (a card NIC or the host uplink)."""

    port_name: str

    def switch_in(self, views: Sequence[memoryview], total: int, hdr: tuple[int, ...]) -> None:
        """Take one frame (header + Ethernet frame, ``total`` bytes) from the switch.

        Must copy what it keeps: the views are the sender's memory and are
        released when this returns. Never raises for the frame's content.
        """
        ...


class L2Switch:
    """A learning Ethernet switch inside the daemon, shared by name.

    Learns source MACs per port; unicast to a learned port, flood broadcast,
    multicast and unknown destinations to every other port, never back to the
    ingress port. Frames keep their virtio-net header across the switch.
    Created by :func:`get_switch` on first use and dropped when its last card
    port leaves (its uplink TAP, if any, is closed then).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.ports: list[SwitchPort] = []
        self.macs: dict[bytes, SwitchPort] = {}
        self.uplink: _TapUplink | None = None
        self.frames = 0
        self.unicast = 0
        self.flooded = 0
        self.filtered = 0  # destination learned on the ingress port

    def join(self, port: SwitchPort) -> None:
        if port not in self.ports:
            self.ports.append(port)

    def leave(self, port: SwitchPort) -> None:
        """Remove a port (and what it taught); the last card port drops the switch."""
        if port in self.ports:
            self.ports.remove(port)
        for mac in [m for m, p in self.macs.items() if p is port]:
            del self.macs[mac]
        if not any(isinstance(p, SwitchNetBackend) for p in self.ports):
            if self.uplink is not None:
                up, self.uplink = self.uplink, None
                self.ports.remove(up)
                for mac in [m for m, p in self.macs.items() if p is up]:
                    del self.macs[mac]
                up.close()
            if _SWITCHES.get(self.name) is self:
                del _SWITCHES[self.name]
        else:
            self.update_uplink_offloads()

    def forward(
        self, ingress: SwitchPort, views: Sequence[memoryview], total: int, hdr: tuple[int, ...]
    ) -> None:
        """Learn the source, deliver to the destination port(s)."""
        self.frames += 1
        v0 = views[0]
        if len(v0) >= _MAC_HDR:
            macs = bytes(v0[NET_HDR_SIZE:_MAC_HDR])
        else:
            buf = bytearray(_MAC_HDR)
            gather_segments(views, memoryview(buf))
            macs = bytes(buf[NET_HDR_SIZE:])
        dst, src = macs[:6], macs[6:]
        if not is_multicast(src) and self.macs.get(src) is not ingress:
            self.macs[src] = ingress  # learn (or a MAC moved ports)
        if not is_multicast(dst):
            out = self.macs.get(dst)
            if out is ingress:
                self.filtered += 1
                return
            if out is not None:
                self.unicast += 1
                out.switch_in(views, total, hdr)
                return
        self.flooded += 1
        for p in self.ports:
            if p is not ingress:
                p.switch_in(views, total, hdr)

    def attach_uplink(self, ifname: str, host_ip: str | None, netns: str | None, mtu: int) -> None:
        """Create the host TAP uplink (once per switch; the same name is shared).

        Raises:
            TapPermissionError, TapError: the TAP cannot be created or configured.
            ConfigError: the switch already has an uplink with another name.
        """
        if self.uplink is not None:
            if self.uplink.tap.name != ifname or self.uplink.tap.netns != netns:
                raise ConfigError(
                    f"switch {self.name} already has uplink {self.uplink.tap.name!r}, "
                    f"not {ifname!r}"
                )
            return
        self.uplink = _TapUplink(self, ifname, host_ip, netns, mtu)
        self.join(self.uplink)
        self.update_uplink_offloads()

    def update_uplink_offloads(self) -> None:
        """The uplink TAP receives only what every live card port accepts
        (GSO toward a card without GUEST_TSO would be dropped)."""
        up = self.uplink
        if up is None:
            return
        cards = [p for p in self.ports if isinstance(p, SwitchNetBackend) and p._live]
        o = _NO_OFFLOADS
        if cards:
            o = Offloads(
                csum=all(c._to_card.csum for c in cards),
                tso4=all(c._to_card.tso4 for c in cards),
                tso6=all(c._to_card.tso6 for c in cards),
                ecn=all(c._to_card.ecn for c in cards),
            )
        up.set_offloads(o)

    def start(self) -> None:
        """Start the uplink's reader on the running loop (idempotent)."""
        if self.uplink is not None:
            self.uplink.start()

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ports": [p.port_name for p in self.ports],
            "macs": {format_mac(m): p.port_name for m, p in self.macs.items()},
            "uplink": self.uplink.tap.name if self.uplink is not None else None,
            "frames": self.frames,
            "unicast": self.unicast,
            "flooded": self.flooded,
            "filtered": self.filtered,
        }


_SWITCHES: dict[str, L2Switch] = {}


def get_switch(name: str) -> L2Switch:
    """The switch called ``name`` in this process (created on first use)."""
    sw = _SWITCHES.get(name)
    if sw is None:
        sw = _SWITCHES[name] = L2Switch(name)
    return sw


def switches() -> dict[str, L2Switch]:
    """The live switches by name (a copy)."""
    return dict(_SWITCHES)


class _TapUplink:
    """A host TAP attached to a switch as one more port (the host's leg)."""

    def __init__(
        self, switch: L2Switch, ifname: str, host_ip: str | None, netns: str | None, mtu: int
    ) -> None:
        self.switch = switch
        self.port_name = f"tap:{ifname}"
        self.host_ip = host_ip
        tap = Tap.open(ifname, netns=netns)
        try:
            _set_tap_offloads(tap, _NO_OFFLOADS)
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
                _set_tap_offloads(self.tap, o)
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


class SwitchNetBackend(NetBackend):
    """A card NIC on a userspace :class:`L2Switch` (no privileges needed).

    Options (besides :class:`NetBackend`'s): ``switch`` (switch name, default
    ``sw0``), ``card_ip`` (default ``172.31.255.{node}/24``), ``uplink`` (a
    host TAP to attach to the switch, created with the first port naming it;
    needs privileges), ``host_ip`` (the uplink's address, default
    ``172.31.255.254/24``), ``netns`` (the uplink's namespace), ``backlog``
    (frames kept per port while the card has no RX buffers; beyond it frames
    are dropped and counted (``drops.rx.backlog``), so a card that stops posting
    buffers never holds the others up).

    Raises (constructor):
        ConfigError: a bad option, the card namespace is foreign, a second
            uplink with another name.
        TapPermissionError, TapError: the uplink TAP cannot be created.
    """

    kind = "switch"

    def __init__(
        self,
        *,
        name: str = "net",
        card: str = "mic0",
        node: int = 1,
        switch: str = "sw0",
        card_ip: str | None = None,
        uplink: str | None = None,
        host_ip: str | None = None,
        netns: str | None = None,
        backlog: int = SWITCH_BACKLOG,
        **common: Any,
    ) -> None:
        node = int(node)
        if card_ip is None:
            card_ip = f"172.31.255.{node}/24"
        super().__init__(name=name, card=card, node=node, card_ip=card_ip, **common)
        if not switch:
            raise ConfigError(f"net {name}: empty switch name")
        self.switch_name = switch
        self.port_name = f"{card}/{name}"
        self.backlog_limit = max(1, int(backlog))
        self._backlog: collections.deque[bytearray] = collections.deque()
        self.uplink_name = uplink
        self.host_ip = (host_ip if host_ip is not None else "172.31.255.254/24") if uplink else None
        self.netns = netns
        sw = get_switch(switch)
        try:
            if uplink:
                sw.attach_uplink(uplink, self.host_ip, netns, self.mtu)
            self._claim_card_netns()
        except BaseException:
            sw.leave(self)  # drops a switch that has no card port (and its uplink)
            raise
        sw.join(self)
        self.switch = sw

    def _gateway(self) -> str | None:
        return _addr(self.host_ip) if self.uplink_name else None

    def _host_info(self) -> dict[str, Any]:
        return {
            "host_interface": self.switch_name,
            "host_ip": self.host_ip,
            "netns": self.netns,
            "uplink": self.uplink_name,
            "backlog": len(self._backlog),
            "switch": self.switch.info(),
        }

    def _close_host_side(self) -> None:
        self._backlog.clear()
        self.switch.leave(self)

    def _started(self) -> None:
        self.switch.start()

    def _session_started(self) -> None:
        self.switch.update_uplink_offloads()

    def _session_ended(self) -> None:
        if self._backlog:
            self.rx_drops["not_ready"] += len(self._backlog)
            self._backlog.clear()
        self.switch.update_uplink_offloads()

    def _transmit(self, views: list[memoryview], total: int, hdr: tuple[int, ...]) -> bool:
        self.switch.forward(self, views, total, hdr)
        return True

    # -- frames from the switch -> this card --------------------------------------------
    def switch_in(self, views: Sequence[memoryview], total: int, hdr: tuple[int, ...]) -> None:
        if not self._live:
            q = self._rxq
            if q is None or q.state is not EndpointState.LIVE:
                self.rx_drops["not_ready"] += 1  # no driver: a NIC without one drops
                return
            self._begin_session()  # live before our loops ran
        if not self.link_up:
            self.rx_drops["link_down"] += 1
            return
        gso_type = hdr[1]
        if gso_type:
            if not self._to_card.accepts(gso_type, 0):
                # No software segmentation here, and no copy for a frame the
                # card cannot take (§5.1.6.4 forbids GSO it did not negotiate).
                self.rx_drops["offload"] += 1
                return
        elif total - NET_HDR_SIZE > self.mtu + ETH_HLEN + _VLAN:
            self.rx_drops["oversize"] += 1
            return
        if self._backlog or not self._copy_in(views, total, hdr):
            if len(self._backlog) >= self.backlog_limit:
                self.rx_drops["backlog"] += 1
                return
            buf = bytearray(total)
            gather_segments(views, memoryview(buf))
            self._backlog.append(buf)  # as it came: _copy_in fixes the header later

    def _copy_in(self, views: Sequence[memoryview], total: int, hdr: tuple[int, ...]) -> bool:
        """One copy of the frame into the card's RX buffers, then the header made
        acceptable to the card (as the TAP path does); False if the card has not
        posted enough (the frame is then queued)."""
        if not self._reserve(total):
            return False
        held = self._held
        if self._mrg:
            if self._held_cap < total:  # all buffers held and still too small
                self.rx_drops["truncated"] += 1
                return True
            dst: list[memoryview] = []
            room = 0
            for c in held:
                dst.extend(c.writable)
                room += c.writable_len
                if room >= total:
                    break
        else:
            first = held[0]
            if first.writable_len < total:
                self.rx_drops["truncated"] += 1
                return True
            dst = first.writable
        _scatter(views, dst, total)
        if (hdr[0] or hdr[1]) and not self._fix_rx_header(dst, total, hdr):
            return True  # dropped; the held buffers stay for the next frame
        self._commit(total)
        self._count_rx(total, hdr[1])
        return True

    def _rx_resume(self) -> None:
        backlog = self._backlog
        while backlog:
            frame = backlog[0]
            if not self._copy_in([memoryview(frame)], len(frame), NET_HDR.unpack_from(frame)):
                return
            backlog.popleft()


# ---------------------------------------------------------------------------
# factory


def create_net_backend(*, backend: str = "tap", **options: Any) -> NetBackend:
    """The ``net`` backend factory: ``backend = "tap"`` (default) or ``"switch"``.

    Raises:
        ConfigError: unknown ``backend``, bad options, the card namespace is
            foreign; TapPermissionError / TapError (ConfigError subclasses)
            when a TAP cannot be created.
    """
    if backend == "tap":
        return TapNetBackend(**options)
    if backend == "switch":
        return SwitchNetBackend(**options)
    raise ConfigError(f"net: unknown backend {backend!r} (tap or switch)")
