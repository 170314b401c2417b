"""The daemon's vhost-user exports: a QEMU guest as one more port of a daemon switch.

Owns :class:`VhostUserExports`, the vhost-user net sockets a ``mic-host``
daemon serves (``micctl vhost-user export``). Each is a
:class:`~mic_host.vhost_user.net.NetVhostUserServer` whose backend is a
:class:`~mic_host.backends.net.SwitchNetBackend` on the daemon's own switch
registry, the one its cards' ``backend = "switch"`` NICs plug into, so a card
and a QEMU guest share one L2 switch. What the guest's front-end does wrong
drops only its connection (see :mod:`mic_host.vhost_user.server`); the
switch, the cards and the other exports carry on.

Imports :mod:`mic_host.vhost_user.net` and the net backends; the daemon
(above) owns one :class:`VhostUserExports` and closes it when it stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mic_host.backends.net import SwitchNetBackend, SwitchRegistry
from mic_host.config import DaemonConfig
from mic_host.vhost_user.net import NetVhostUserServer, build_net_backend
from virtio.errors import ConfigError, LocalProtocolError

__all__ = ["VhostUserExports", "configured_switches"]

log = logging.getLogger("mic_host.vhost_user")


def configured_switches(config: DaemonConfig) -> set[str]:
    """The switches the cards of ``config`` name (``backend = "switch"`` net devices)."""
    return {
        str(d.options.get("switch", "sw0"))
        for c in config.cards
        for d in c.devices
        if d.type == "net" and d.options.get("backend") == "switch"
    }


@dataclass(eq=False)
class _Export:
    switch: str
    socket: Path
    port: str
    server: NetVhostUserServer
    stack: AsyncExitStack

    def info(self) -> dict[str, Any]:
        stats = self.server.stats()
        return {
            "socket": str(self.socket),
            "switch": self.switch,
            "port": self.port,
            "connected": self.server.connected,
            "connections": self.server.connections,
            "dropped": self.server.dropped,
            "counters": self.server.net.stats(),
            "queues": stats["queues"],
        }


class VhostUserExports:
    """The vhost-user net sockets of one daemon, by socket path.

    ``registry`` is the switch registry the daemon's cards use;
    ``configured`` names the switches the daemon's config mentions (a switch
    exists only while a port is on it, so one of a card that is not booted
    yet is not live: it may still be exported to).
    """

    def __init__(self, registry: SwitchRegistry, configured: Callable[[], Iterable[str]]) -> None:
        self._registry = registry
        self._configured = configured
        self._exports: dict[Path, _Export] = {}

    def _known(self) -> set[str]:
        return set(self._registry.snapshot()) | set(self._configured())

    async def export(self, switch: str, socket: str, mtu: int = 1500) -> dict[str, Any]:
        """Serve a vhost-user net socket at ``socket`` (an absolute path) on switch
        ``switch``; returns its :meth:`list` entry.

        Raises:
            LocalProtocolError: a relative path, a socket already exported, a
                switch neither live nor configured, a bad MTU, a path that
                cannot be listened on (the message names it).
        """
        path = Path(socket)
        if not path.is_absolute():
            raise LocalProtocolError(f"vhost-user socket {socket!r}: give an absolute path")
        if path in self._exports:
            raise LocalProtocolError(f"{socket} is already exported (switch {switch})")
        known = self._known()
        if switch not in known:
            names = ", ".join(sorted(known)) or "none"
            raise LocalProtocolError(
                f"no switch {switch!r} in this daemon (switches: {names}); "
                'a card\'s net device with backend = "switch" names one'
            )
        try:
            backend = build_net_backend(
                switch=switch,
                registry=self._registry,
                mtu=int(mtu),
                name=str(path),
                port="vhost-user",
            )
        except ConfigError as e:
            raise LocalProtocolError(f"vhost-user export {socket}: {e}") from e
        assert isinstance(backend, SwitchNetBackend)
        server = NetVhostUserServer(backend, path)
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(server)
        except OSError as e:
            await backend.aclose()  # leaves the switch again
            raise LocalProtocolError(f"cannot listen on {socket}: {e}") from e
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)  # the daemon user's alone, as mic-vhost-user's socket
        ex = _Export(switch, path, backend.port_name, server, stack)
        self._exports[path] = ex
        log.info("vhost-user: exporting switch %s on %s", switch, path)
        return ex.info()

    async def unexport(self, socket: str) -> dict[str, Any]:
        """Stop serving ``socket``: its front-end is disconnected, its port leaves
        the switch, the socket file goes. Returns the export's last entry.

        Raises:
            LocalProtocolError: ``socket`` is not exported.
        """
        ex = self._exports.get(Path(socket))
        if ex is None:
            names = ", ".join(str(p) for p in self._exports) or "none"
            raise LocalProtocolError(f"{socket} is not exported (exports: {names})")
        info = ex.info()
        del self._exports[ex.socket]
        await ex.stack.aclose()
        log.info("vhost-user: %s unexported", ex.socket)
        return info

    def list(self) -> dict[str, Any]:
        """``{"exports": [{socket, switch, port, connected, counters, ...}, ...]}``."""
        return {"exports": [ex.info() for ex in self._exports.values()]}

    async def aclose(self) -> None:
        """Stop every export (the daemon is stopping)."""
        for ex in list(self._exports.values()):
            del self._exports[ex.socket]
            try:
                await ex.stack.aclose()
            except Exception:  # one export's trouble must not keep the others open
                log.exception("vhost-user: closing the export on %s", ex.socket)
