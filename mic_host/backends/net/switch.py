"""A userspace L2 switch inside the daemon and the card NICs that plug into it.

- :class:`L2Switch` learns source MACs per port, forwards unicast to a
  learned port, floods the rest, never back to the ingress port; frames keep
  their virtio-net header across it. It may have a host TAP uplink
  (:class:`~mic_host.backends.net.uplink.TapUplink`).
- :class:`SwitchRegistry`: the switches of one owner by name (created on
  first use, dropped when their last card port leaves). The owner is the
  ``net`` backend factory (:class:`~mic_host.backends.net.NetBackendFactory`):
  one registry per factory, no module-global state.
- :class:`SwitchNetBackend` (``backend = "switch"``) is one port of a switch;
  it needs no privileges. A frame is copied once per destination (card A's
  memory into card B's), and offloads a receiver did not negotiate are
  resolved (partial checksums completed in software, GSO dropped and counted).

Imports :mod:`.core` and :mod:`.uplink`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from mic_host.backends.net.core import SWITCH_BACKLOG, NetBackend
from mic_host.backends.net.frames import (
    MAC_HDR,
    NO_OFFLOADS,
    VLAN,
    address_of,
    scatter,
)
from mic_host.backends.net.uplink import TapUplink
from mic_host.endpoint import EndpointState
from virtio.errors import (
    ConfigError,
)
from virtio.net import (
    ETH_HLEN,
    NET_HDR,
    NET_HDR_SIZE,
    Offloads,
    format_mac,
    is_multicast,
)
from virtio.split import gather_segments

log = logging.getLogger(__name__)


log = logging.getLogger("mic_host.backends.net")


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
    Created by its :class:`SwitchRegistry` on first use and dropped from it
    when its last card port leaves (its uplink TAP, if any, is closed then).
    """

    def __init__(self, name: str, registry: SwitchRegistry) -> None:
        self.name = name
        self._registry = registry
        self.ports: list[SwitchPort] = []
        self.macs: dict[bytes, SwitchPort] = {}
        self.uplink: TapUplink | None = None
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
            self._registry.drop(self)
        else:
            self.update_uplink_offloads()

    def forward(
        self, ingress: SwitchPort, views: Sequence[memoryview], total: int, hdr: tuple[int, ...]
    ) -> None:
        """Learn the source, deliver to the destination port(s)."""
        self.frames += 1
        v0 = views[0]
        if len(v0) >= MAC_HDR:
            macs = bytes(v0[NET_HDR_SIZE:MAC_HDR])
        else:
            buf = bytearray(MAC_HDR)
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
        self.uplink = TapUplink(self, ifname, host_ip, netns, mtu)
        self.join(self.uplink)
        self.update_uplink_offloads()

    def update_uplink_offloads(self) -> None:
        """The uplink TAP receives only what every live card port accepts
        (GSO toward a card without GUEST_TSO would be dropped)."""
        up = self.uplink
        if up is None:
            return
        cards = [p for p in self.ports if isinstance(p, SwitchNetBackend) and p._live]
        o = NO_OFFLOADS
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


class SwitchRegistry:
    """The switches of one owner (the ``net`` backend factory), by name."""

    def __init__(self) -> None:
        self._switches: dict[str, L2Switch] = {}

    def get(self, name: str) -> L2Switch:
        """The switch called ``name`` (created on first use)."""
        sw = self._switches.get(name)
        if sw is None:
            sw = self._switches[name] = L2Switch(name, self)
        return sw

    def drop(self, sw: L2Switch) -> None:
        """Forget ``sw`` (its last card port left)."""
        if self._switches.get(sw.name) is sw:
            del self._switches[sw.name]

    def snapshot(self) -> dict[str, L2Switch]:
        """The live switches by name (a copy)."""
        return dict(self._switches)


class SwitchNetBackend(NetBackend):
    """A card NIC on a userspace :class:`L2Switch` (no privileges needed).

    Options (besides :class:`NetBackend`'s): ``switch`` (switch name, default
    ``sw0``), ``card_ip`` (default ``172.31.255.{node}/24``), ``uplink`` (a
    host TAP to attach to the switch, created with the first port naming it;
    needs privileges), ``host_ip`` (the uplink's address, default
    ``172.31.255.254/24``), ``netns`` (the uplink's namespace), ``backlog``
    (frames kept per port while the card has no RX buffers; beyond it frames
    are dropped and counted (``drops.rx.backlog``), so a card that stops posting
    buffers never holds the others up). ``registry`` is the factory's
    :class:`SwitchRegistry` the switch is looked up in.

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
        registry: SwitchRegistry,
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
        sw = registry.get(switch)
        try:
            if uplink:
                sw.attach_uplink(uplink, self.host_ip, netns, self.mtu)
            self._acquire_card_netns()
        except BaseException:
            sw.leave(self)  # drops a switch that has no card port (and its uplink)
            raise
        sw.join(self)
        self.switch = sw

    def _gateway(self) -> str | None:
        return address_of(self.host_ip) if self.uplink_name else None

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
        elif total - NET_HDR_SIZE > self.mtu + ETH_HLEN + VLAN:
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
        scatter(views, dst, total)
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
