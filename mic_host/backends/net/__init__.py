"""virtio-net device backends (virtio 1.2 §5.1): a host TAP per card NIC, or a userspace L2 switch.

- :mod:`.core`: :class:`NetBackend`, the device core every card NIC shares
  (rings, header checks, RX buffer accounting, counters, ``info()``);
- :mod:`.frames`: frames on scatter lists (header, copies, constants);
- :mod:`.netns`: the card's network namespace, owned by the daemon
  (created when the backend is built, deleted when the device goes for good);
- :mod:`.tap`: :class:`TapNetBackend` (``backend = "tap"``, mpssd's model);
- :mod:`.uplink`: a host TAP as a switch port;
- :mod:`.switch`: :class:`L2Switch`, :class:`SwitchRegistry` and
  :class:`SwitchNetBackend` (``backend = "switch"``, no privileges needed);
- this module: the ``net`` backend factory, :data:`create_net_backend`.

Who owns what: the factory (one :class:`NetBackendFactory` object, the one
the backend registry calls for ``net``) owns the switches
(:class:`SwitchRegistry`) and the card namespaces it created
(:class:`~mic_host.backends.net.netns.NetnsOwner`); backends receive them,
nothing reaches a module global. In the daemon that is one factory per
process, so cards on the same switch name share one switch.

Imports point down: this module -> switch -> uplink -> core -> frames,
netns. Must
not import ``mic_card``; uses ``transport.tap`` for the kernel plumbing only.
"""

from __future__ import annotations

from typing import Any

from mic_host.backends.net.core import NET_QUEUE_SIZE, NetBackend
from mic_host.backends.net.netns import NetnsOwner
from mic_host.backends.net.switch import L2Switch, SwitchNetBackend, SwitchRegistry
from mic_host.backends.net.tap import TapNetBackend
from virtio.errors import ConfigError
from virtio.net import MAX_PACKET

__all__ = [
    "MAX_PACKET",
    "NET_QUEUE_SIZE",
    "L2Switch",
    "NetBackend",
    "NetBackendFactory",
    "NetnsOwner",
    "SwitchNetBackend",
    "SwitchRegistry",
    "TapNetBackend",
    "create_net_backend",
    "switches",
]


class NetBackendFactory:
    """The ``net`` backend factory: ``backend = "tap"`` (default) or ``"switch"``.

    Owns the switches its ``switch`` backends plug into (:attr:`switches`) and
    the card namespaces its backends acquired (:attr:`namespaces`).
    """

    def __init__(self) -> None:
        self.switches = SwitchRegistry()
        self.namespaces = NetnsOwner()

    def __call__(self, *, backend: str = "tap", **options: Any) -> NetBackend:
        """Build one card NIC backend.

        Raises:
            ConfigError: unknown ``backend``, bad options, the card namespace is
                foreign; TapPermissionError / TapError (ConfigError subclasses)
                when a TAP cannot be created.
        """
        if backend == "tap":
            return TapNetBackend(namespaces=self.namespaces, **options)
        if backend == "switch":
            return SwitchNetBackend(registry=self.switches, namespaces=self.namespaces, **options)
        raise ConfigError(f"net: unknown backend {backend!r} (tap or switch)")


#: The factory the backend registry uses for ``net`` (one per process).
create_net_backend = NetBackendFactory()


def switches() -> dict[str, L2Switch]:
    """The live switches of :data:`create_net_backend`, by name (a copy)."""
    return create_net_backend.switches.snapshot()
