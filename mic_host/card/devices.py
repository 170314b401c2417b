"""A card's devices as the daemon keeps them across boots: entries, host names, ptys, backends.

The device list starts as the card's config and changes with hot plug; it
outlives every boot, and so do the consoles' ptys (a terminal attached to
``micctl console`` survives a reboot). Each boot asks it for one backend per
entry (:meth:`DeviceSet.make_backend`), filling in what derives from the card
(console pty and log, the net defaults: TAP name, addresses, MAC, state dir).

Imports the backend registry (and the ``net`` factory, owner of the card
namespaces), the config and ``mic_host.paths``; never the session or the
manager above it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from mic_host.backends import Backend, create_backend, open_backend
from mic_host.backends.console import ConsoleBackend, ConsolePty
from mic_host.backends.net import create_net_backend
from mic_host.backends.vhost_user import QUEUE_SIZE as VHOST_USER_QUEUE_SIZE
from mic_host.backends.vhost_user import VhostUserBlockBackend
from mic_host.config import DeviceConfig
from mic_host.config.options import TRANSPORT_OPTION_NAMES
from mic_host.paths import card_log_path, netns_record_path
from virtio.errors import ConfigError, LocalProtocolError

__all__ = ["DeviceSet"]

log = logging.getLogger("mic_host.card")


class DeviceSet:
    """The devices of card ``card``: ``entries`` in device-page order."""

    def __init__(
        self, card: str, entries: list[DeviceConfig], *, state_dir: Path, node_id: int
    ) -> None:
        self.card = card
        self.state_dir = state_dir
        self.node_id = node_id
        self.entries: list[DeviceConfig] = list(entries)
        #: one pty per console device, for the daemon's life (survives reboots)
        self.ptys: dict[str, ConsolePty] = {}
        for i, d in enumerate(self.entries):
            if d.type == "console":
                self.pty(self.name_of(d, i))

    @staticmethod
    def name_of(dev: DeviceConfig, index: int) -> str:
        """The host name of entry ``index`` (explicit, or type + index)."""
        return dev.name or f"{dev.type}{index}"

    def named(self, dtype: str | None = None) -> list[tuple[str, DeviceConfig]]:
        """``(host name, entry)`` of every device (of type ``dtype``)."""
        return [
            (self.name_of(d, i), d)
            for i, d in enumerate(self.entries)
            if dtype is None or d.type == dtype
        ]

    @staticmethod
    def user_label(dev: DeviceConfig) -> str:
        """How messages name ``dev``: ``block 'disk'`` if the user named it, else ""
        (a derived name such as ``block11`` means nothing to them: the path does)."""
        if dev.name is None or re.fullmatch(rf"{re.escape(dev.type)}\d+", dev.name):
            return ""
        return f"{dev.type} {dev.name!r}"

    def pty(self, device: str) -> ConsolePty:
        """The pty of console ``device`` (opened again if it was closed)."""
        pty = self.ptys.get(device)
        if pty is None or pty.closed:
            pty = self.ptys[device] = ConsolePty(f"{self.card} {device}")
            # mpssd's words, so scripts that grep for them keep working
            log.info("%s console message goes to %s", self.card, pty.path)
        return pty

    def console_log(self, device: str) -> Path:
        """``<card>-console.log`` for the first console, ``<card>-<device>.log`` for others."""
        first = next((n for n, _ in self.named("console")), device)
        suffix = "console" if device == first else device
        return card_log_path(self.state_dir, self.card, suffix)

    def make_backend(self, dev: DeviceConfig, index: int) -> Backend:
        """The backend for ``dev`` at ``index`` (console pty and log, net defaults filled in).

        Raises:
            ConfigError: bad options, or what the backend refuses (a TAP...).
        """
        opts: dict[str, Any] = {
            k: v for k, v in dev.options.items() if k not in TRANSPORT_OPTION_NAMES
        }
        name = self.name_of(dev, index)
        if dev.type == "block" and opts.pop("backend", "file") == "vhost-user":
            return VhostUserBlockBackend(
                name,
                opts["socket"],
                queue_size=opts.get("queue_size", VHOST_USER_QUEUE_SIZE),
                label=self.user_label(dev),
                card=self.card,
            )
        if dev.type == "block":
            opts["path"] = opts.pop("image")
            # errors name what the user chose: the label if they gave one, else the path
            opts |= {"label": self.user_label(dev), "card": self.card}
            opts["state_dir"] = str(self.state_dir)
        elif dev.type == "console":
            opts.setdefault("log_path", str(self.console_log(name)))
            opts["pty"] = self.pty(name)
        elif dev.type == "net":
            # Defaults (TAP name, mpssd's 172.31.N+1.x addresses, MAC) derive from the card.
            opts |= {"card": self.card, "node": self.node_id, "state_dir": str(self.state_dir)}
        try:
            backend = create_backend(dev.type, name=name, **opts)
        except ConfigError as e:
            # "net net2: ..." names a label the daemon made up: say "net device"
            made_up, text = f"{dev.type} {name}: ", str(e)
            if self.user_label(dev) or not text.startswith(made_up):
                raise
            raise type(e)(f"{dev.type} device: {text[len(made_up) :]}") from None
        if isinstance(backend, ConsoleBackend) and backend.agent is not None:
            backend.agent.label = self.card
        return backend

    @staticmethod
    def packed(dev: DeviceConfig) -> bool:
        """``dev`` asks for the packed ring (``ring = "packed"``: VOP offers
        VIRTIO_F_RING_PACKED)."""
        return dev.options.get("ring") == "packed"

    async def open_backend(self, dev: DeviceConfig, index: int) -> Backend:
        """:meth:`make_backend`, then the backend's own async opening (a vhost-user
        back-end is asked what it offers); closed again if that fails.

        Raises:
            ConfigError: as :meth:`make_backend`, or the backend cannot be opened.
        """
        backend = self.make_backend(dev, index)
        try:
            await open_backend(backend)
        except BaseException:
            await backend.aclose()
            raise
        return backend

    def new_entry(self, dtype: str, name: str | None, options: dict[str, Any]) -> DeviceConfig:
        """The entry a device attached now gets (not added yet: :meth:`append` it).

        Raises:
            LocalProtocolError: the name is taken.
        """
        dev = DeviceConfig(type=dtype, name=name or f"{dtype}{len(self.entries)}", options=options)
        if dev.name in {n for n, _ in self.named()}:
            raise LocalProtocolError(f"{self.card}: a device named {dev.name!r} exists")
        return dev

    def append(self, dev: DeviceConfig) -> None:
        self.entries.append(dev)

    def remove(self, index: int) -> str:
        """Forget entry ``index``; returns its host name (close its pty with
        :meth:`drop_pty` once the device is gone). Later devices keep their
        (explicit or derived) names."""
        dev = self.entries.pop(index)
        name = self.name_of(dev, index)
        for j in range(index, len(self.entries)):
            d = self.entries[j]
            if d.name is None:
                self.entries[j] = DeviceConfig(
                    type=d.type, name=self.name_of(d, j + 1), options=d.options
                )
        return name

    async def release(self, device: str) -> None:
        """Device ``device`` is gone for good (detached; its backend is closed):
        close its pty, and let go of the card namespace a NIC made for it (the
        daemon owns that namespace: it outlives boots, not the device)."""
        pty = self.ptys.pop(device, None)
        if pty is not None:
            pty.close()
        await create_net_backend.namespaces.release(
            netns_record_path(self.state_dir, self.card, device)
        )

    async def aclose(self) -> None:
        """Daemon exit (the card is down): close every pty, delete the card
        namespaces its NICs made."""
        for pty in self.ptys.values():
            pty.close()
        for name, _ in self.named("net"):
            await create_net_backend.namespaces.release(
                netns_record_path(self.state_dir, self.card, name)
            )
