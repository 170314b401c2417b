"""The virtio-net device core (virtio 1.2 §5.1) every card NIC backend shares.

Owns the device side of a card NIC's rings: queue 0 is the receiveq (host ->
card, the card posts writable buffers), queue 1 the transmitq (card -> host).
Every frame on either ring is the 12-byte VERSION_1 header followed by an
Ethernet frame, so GSO (64 KiB TSO segments) and partial checksums travel as
one chain; the offer is :data:`virtio.net.DEVICE_FEATURES`.

:class:`NetBackend`: config space and link status, the transmitq loop
(header checks against what the card negotiated, bad frames dropped and
counted by reason, never an exception), the receiveq buffer accounting
(chains held between packets, ``num_buffers`` for MRG_RXBUF §5.1.6.4, no busy
loop when the card posts no buffers), the card's network namespace (through
:mod:`mic_host.backends.net.netns`), counters and :meth:`~NetBackend.info`.
Where frames go and come from is a subclass's: :mod:`.tap`, :mod:`.switch`.

Imports of the package only :mod:`.frames` and :mod:`.netns`; must not
import ``mic_card``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mic_host.backends import BackendContext
from mic_host.backends.net.frames import (
    IOV_MAX,
    NO_OFFLOADS,
    read_hdr,
    set_num_buffers,
)
from mic_host.backends.net.netns import NetnsOwner, card_needs_netns
from mic_host.endpoint import EndpointState, QueueEndpoint
from mic_host.events import emit
from mic_host.paths import netns_record_path
from virtio.constants import DeviceType, NetFeature, NetHdrFlag
from virtio.errors import (
    ConfigError,
    LocalProtocolError,
    MicError,
    WouldBlock,
)
from virtio.net import (
    DEVICE_FEATURES,
    NET_HDR_SIZE,
    FrameError,
    Offloads,
    build_config,
    check_header,
    format_mac,
    guest_offloads,
    host_offloads,
    is_multicast,
    parse_mac,
    random_mac,
    segments_checksum,
)
from virtio.split import Chain, scatter_segments, slice_segments

log = logging.getLogger("mic_host.backends.net")

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


# ---------------------------------------------------------------------------
# the device core


class NetBackend:
    """The device core of a card NIC; subclasses say where frames go and come from.

    Common options: ``name`` (host device name), ``card``/``node``/
    ``state_dir`` (given by the daemon), ``mac`` (``aa:bb:..``; default
    ``random_mac(f"{card}/{name}")``), ``mtu`` (68..65535, default 1500),
    ``card_ip``, ``card_netns`` (namespace the card puts its TAP in; default
    the card name), ``card_mode`` (``auto``/``tap``/``frames``). Both queues
    have :data:`NET_QUEUE_SIZE` entries. ``namespaces`` (given by the factory)
    is the owner of the card namespaces: the backend acquires ``card_netns``
    from it when the card side will open a TAP there (see
    :mod:`mic_host.backends.net.netns`); without one it leaves namespaces alone.

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
        namespaces: NetnsOwner | None = None,
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
        self._namespaces = namespaces
        self._closed = False
        # session: from the first chain after DRIVER_OK to the next reset
        self._live = False
        self._features = 0
        self._mrg = False
        self._from_card = NO_OFFLOADS  # what we accept on the transmitq
        self._to_card = NO_OFFLOADS  # what the card accepts on the receiveq
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
        """Release the host side (subclasses). The card's namespace stays: it
        outlives this boot and goes when the device does
        (:meth:`NetnsOwner.release <mic_host.backends.net.netns.NetnsOwner.release>`).
        """
        if self._closed:
            return
        self._closed = True
        self._end_session()
        self._close_host_side()

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

    def _tx_drained(self, q: QueueEndpoint) -> None:
        """The transmitq is empty for now (after a batch shorter than :data:`TX_BATCH`)."""

    def _close_host_side(self) -> None:
        """Close the TAP / leave the switch."""

    def _host_info(self) -> dict[str, Any]:
        return {}

    # -- the card's network namespace --------------------------------------------
    def netns_record(self) -> Path | None:
        """``STATE_DIR/CARD-DEVICE.netns``: the record of the card namespace this NIC uses."""
        if self.state_dir is None:
            return None
        return netns_record_path(self.state_dir, self.card, self.name)

    def _acquire_card_netns(self) -> None:
        """Make sure ``card_netns`` exists and is ours before the card boots, when
        the card side will open its TAP there (the last step of a constructor).

        Raises:
            ConfigError: the namespace exists and is not ours, or cannot be made.
        """
        if self._namespaces is not None and card_needs_netns(self.card_mode, self.card_netns):
            self._namespaces.acquire(self.card_netns, self.netns_record())

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
            else:
                self._tx_drained(q)

    def _tx_one(self, q: QueueEndpoint, chain: Chain) -> None:
        """Check one TX chain (§5.1.6.2) and hand it on; never raises for the card's input."""
        total = chain.readable_len
        views = chain.readable
        if total < NET_HDR_SIZE:
            self.tx_drops["runt"] += 1
        else:
            hdr = read_hdr(views)
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
                if len(held) >= q.size or len(held) >= IOV_MAX:
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
        if len(iov) > IOV_MAX:
            iov = iov[:IOV_MAX]
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
            set_num_buffers(first, 1)
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
        set_num_buffers(first, len(used))
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
                # Summed where the packet lies in the card's buffers, no gather.
                frame = slice_segments(views, NET_HDR_SIZE, frame_len)
                try:
                    csum = segments_checksum(frame, csum_start, csum_offset)
                except LocalProtocolError:
                    self.rx_drops["bad_header"] += 1
                    return False
                scatter_segments(views, csum, NET_HDR_SIZE + csum_start + csum_offset)
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
        emit("link_up" if up else "link_down", self.card, name=self.name)
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
            # only a namespace that exists: none when the card side exchanges
            # frames (frames mode, or tap mode without the privilege for it)
            "card_netns": (
                self.card_netns if card_needs_netns(self.card_mode, self.card_netns) else None
            ),
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
