"""vhost-user net: MIC-VOP's virtio-net backend served to a QEMU guest (``-netdev vhost-user``).

Owns :class:`NetVhostUserServer`, the vhost-user back-end for one
:class:`mic_host.backends.net.NetBackend` (a host TAP, :class:`TapNetBackend`,
or a port of an :class:`L2Switch`, :class:`SwitchNetBackend`: the same code a
card's NIC runs, unchanged, over the same
:class:`mic_host.endpoint.QueueEndpoint` objects), and
:func:`build_net_backend`, the backend ``mic-vhost-user net`` and the daemon's
export build.

What a net device needs beyond :class:`~mic_host.vhost_user.server.VhostUserServer`
(QEMU ``docs/interop/vhost-user.rst``, "Ring states"; ``hw/net/vhost_net.c``):

- one queue pair: vring 0 is the receiveq, vring 1 the transmitq (QEMU keeps
  the control queue itself); GET_QUEUE_NUM counts queue *pairs*, as QEMU's
  ``-netdev vhost-user,queues=N`` checks them;
- with VHOST_USER_F_PROTOCOL_FEATURES acked a ring starts *disabled* and runs
  only between SET_VRING_ENABLE 1 and 0 (or GET_VRING_BASE): no frame is put
  into a disabled receiveq;
- a ring stops with nothing in flight, but the net backend holds posted RX
  buffers between packets: before the receiveq stops they are given back
  (used, 0 bytes, as when a card resets its NIC), so the base the front-end
  gets back loses no buffer.

The config space (MAC, status, MTU) is QEMU's own (``-device
virtio-net-pci,mac=...``): QEMU's vhost-user net takes only the ring and
offload feature bits from the back-end.
"""

from __future__ import annotations

import os
from typing import Any

from mic_host.backends.net import NET_QUEUE_SIZE, NetBackend, SwitchRegistry
from mic_host.backends.net.switch import SwitchNetBackend
from mic_host.backends.net.tap import TapNetBackend
from mic_host.endpoint import EndpointState
from mic_host.vhost_user.server import VhostUserServer
from mic_host.vhost_user.vring import Vring
from transport.vhost_user import ProtocolFeature
from virtio.errors import ConfigError

__all__ = ["NetVhostUserServer", "build_net_backend"]

_RXQ = 0


def build_net_backend(
    *,
    tap: str | None = None,
    switch: str | None = None,
    registry: SwitchRegistry | None = None,
    uplink: str | None = None,
    host_ip: str | None = None,
    mtu: int = 1500,
    name: str = "vhost-user",
    port: str = "vhost-user",
) -> NetBackend:
    """The backend a vhost-user net socket serves: a host TAP (``tap``) or a port
    of switch ``switch`` in ``registry`` (with an optional host TAP ``uplink``
    at ``host_ip``). ``port`` names the switch port (``port/name`` in
    ``micctl net``); ``host_ip`` is the TAP's address (``A.B.C.D/len``, none
    by default).

    Raises:
        ConfigError: neither or both of ``tap`` and ``switch``; ``uplink``
            without ``switch``; a bad MTU or address. TapPermissionError /
            TapError (ConfigError subclasses) when a TAP cannot be created.
    """
    if (tap is None) == (switch is None):
        raise ConfigError("vhost-user net: give exactly one of a TAP or a switch")
    # no card behind it: no card address, no card namespace
    common: dict[str, Any] = {
        "name": name,
        "card": port,
        "mtu": mtu,
        "card_mode": "frames",
        "card_ip": "",
    }
    if tap is not None:
        if uplink is not None:
            raise ConfigError("vhost-user net: an uplink TAP belongs to a switch, not to --tap")
        return TapNetBackend(ifname=tap, host_ip=host_ip or "", **common)
    assert switch is not None
    return SwitchNetBackend(
        switch=switch,
        registry=registry if registry is not None else SwitchRegistry(),
        uplink=uplink,
        host_ip=host_ip,
        **common,
    )


class NetVhostUserServer(VhostUserServer):
    """Serve one :class:`NetBackend` (one queue pair) on the vhost-user socket ``path``.

    Rings of :data:`~mic_host.backends.net.NET_QUEUE_SIZE` (256, QEMU's
    smallest ``rx_queue_size``) to 1024 entries. An async context manager, as
    :class:`VhostUserServer`; leaving it closes the backend (the TAP goes, or
    the port leaves its switch).
    """

    ring_size_note = (
        "QEMU's rx_queue_size/tx_queue_size range; the RX buffer accounting needs a ring "
        "at least that large"
    )

    #: MQ (GET_QUEUE_NUM) and REPLY_ACK. Not CONFIG: the config space is QEMU's, and
    #: QEMU 7.2's virtio-net warns about it and then crashes (SIGSEGV) at start-up.
    protocol_features = int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)

    def __init__(self, backend: NetBackend, path: str | os.PathLike[str]) -> None:
        super().__init__(backend, path, queue_size=NET_QUEUE_SIZE)
        self.net = backend

    def max_queues(self) -> int:
        return len(self.vrings) // 2

    def _start(self, vr: Vring) -> None:
        if self.protocol_features_acked and not vr.enabled:
            return  # started by SET_VRING_ENABLE 1 ("Ring states")
        super()._start(vr)

    async def _enable_changed(self, vr: Vring) -> None:
        if vr.enabled:
            if not vr.started and vr.kick_fd is not None:
                self._start(vr)
        elif vr.started:
            await self._stop(vr)

    async def _stop(self, vr: Vring) -> None:
        ep = vr.endpoint
        if vr.index % 2 == _RXQ and ep.state is EndpointState.LIVE and ep.on_detach is not None:
            # The backend gives back the RX buffers it holds (used, 0 bytes), as
            # when VOP resets the device; synchronously, so that nothing pops
            # them again before the ring stops.
            ep.on_detach(EndpointState.IDLE)
        await super()._stop(vr)

    def stats(self) -> dict[str, object]:
        out = super().stats()
        out["net"] = self.net.info()
        return out
