"""The host backend plug-in interface: what a virtio device backend is, and a registry.

A backend serves one virtio device on the host (the device side of the
rings): it says what it offers (type, features, config space, queue sizes)
and runs a coroutine over the device's queue endpoints. :class:`mic_host.vop.Vop`
puts it on the device page and runs it.

Backends are found by name: the built-ins (``block``, ``console``, ``net``), anything
registered with :func:`register_backend`, and third-party packages through
the ``mic_vop.backends`` entry-point group (as aioquic registers congestion
controls)::

    [project.entry-points."mic_vop.backends"]
    mydev = "mypkg.mydev:MyBackend"

Must not import ``transport`` or ``mic_card``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from mic_host.endpoint import QueueEndpoint
from virtio.errors import ConfigError
from virtio.memory import Memory

__all__ = [
    "ENTRY_POINT_GROUP",
    "Backend",
    "BackendContext",
    "BackendFactory",
    "ExternalRings",
    "RingHost",
    "RingSpec",
    "available_backends",
    "create_backend",
    "open_backend",
    "register_backend",
]

#: Entry-point group third-party backends register under.
ENTRY_POINT_GROUP = "mic_vop.backends"


class BackendContext(Protocol):
    """What a running backend gets from VOP (implemented by ``VopDevice``)."""

    @property
    def name(self) -> str:
        """The host-side device name."""

    @property
    def queues(self) -> Sequence[QueueEndpoint]:
        """One endpoint per virtqueue, in queue-index order."""

    @property
    def features(self) -> int:
        """Features the card negotiated (0 until FEATURES_OK / DRIVER_OK)."""

    @property
    def log(self) -> logging.Logger:
        """A logger named after the device."""

    async def update_config(self, config: bytes) -> None:
        """Rewrite the config space and run the config-change handshake.

        Raises:
            LocalProtocolError: ``config`` does not have the device's config length.
            MicTimeoutError: the card did not acknowledge in time.
        """


@runtime_checkable
class Backend(Protocol):
    """A virtio device backend.

    ``name`` is the host-side device name (unique per card). ``features()``
    are the device-specific feature bits (VOP adds VERSION_1, EVENT_IDX and
    INDIRECT_DESC); ``config_bytes()`` the initial config space (at most
    200 B with 8 queues; the device-page entry must fit 256 B);
    ``queue_sizes()`` one power of two <= 256 per queue (at most 8 queues).
    ``run(ctx)`` serves the queues until cancelled or until the endpoints
    close; it must not let a bad request escape as an exception. ``aclose()``
    releases files and the like once ``run`` has ended.
    """

    name: str
    device_type: int

    def features(self) -> int: ...

    def config_bytes(self) -> bytes: ...

    def queue_sizes(self) -> Sequence[int]: ...

    async def run(self, ctx: BackendContext) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RingSpec:
    """One vring the card set up, in card-physical (bus) addresses."""

    index: int
    num: int
    desc: int
    avail: int
    used: int


class RingHost(Protocol):
    """What a backend serving its rings itself gets from its device (``VopDevice``)."""

    def ring_interrupt(self) -> None:
        """Raise the card's interrupt for this device (its h2c doorbell)."""

    def ring_fault(self, reason: str) -> None:
        """The rings cannot be served: the device goes to NEEDS_RESET with ``reason``."""


@runtime_checkable
class ExternalRings(Protocol):
    """A backend whose rings are served by someone else (a vhost-user back-end),
    so VOP builds no ``DeviceQueue`` for it: on DRIVER_OK it hands over the ring
    addresses (:meth:`start_rings`), relays the card's doorbell (:meth:`kick`)
    and takes them back on reset, NEEDS_RESET or removal (:meth:`stop_rings`,
    then :meth:`drain_rings` before the reset is acknowledged). The synchronous
    calls only queue work; they never raise for what the other side does.
    """

    def start_rings(
        self, host: RingHost, memory: Memory, rings: Sequence[RingSpec], features: int
    ) -> None: ...

    def stop_rings(self, reason: str) -> None: ...

    async def drain_rings(self) -> None: ...

    def kick(self) -> None: ...


async def open_backend(backend: Backend) -> None:
    """Run ``backend.aopen()`` if it has one: a backend that must ask someone
    (a vhost-user back-end) what it offers before its device goes on the page.

    Raises:
        MicError: what the backend's ``aopen`` raises (its message names the device).
    """
    opener = getattr(backend, "aopen", None)
    if opener is not None:
        await opener()


BackendFactory = Callable[..., Backend]

_registry: dict[str, BackendFactory] = {}
#: Built-ins, imported on first use so this module stays cheap and cycle-free.
_BUILTINS: dict[str, tuple[str, str]] = {
    "block": ("mic_host.backends.block", "BlockBackend"),
    "console": ("mic_host.backends.console", "ConsoleBackend"),
    "net": ("mic_host.backends.net", "create_net_backend"),
}


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make ``factory(**options)`` available as backend ``name``.

    Raises:
        ConfigError: ``name`` is already registered and ``replace`` is False.
    """
    if not replace and (name in _registry or name in _BUILTINS):
        raise ConfigError(f"backend {name!r} is already registered")
    _registry[name] = factory


def _lookup(name: str) -> BackendFactory:
    if name in _registry:
        return _registry[name]
    if name in _BUILTINS:
        module, attr = _BUILTINS[name]
        factory: BackendFactory = getattr(importlib.import_module(module), attr)
        _registry[name] = factory
        return factory
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                loaded: BackendFactory = ep.load()
            except (ImportError, AttributeError) as e:
                raise ConfigError(
                    f"backend {name!r}: cannot load entry point {ep.value}: {e}"
                ) from e
            _registry[name] = loaded
            return loaded
    known = ", ".join(available_backends())
    raise ConfigError(f"unknown backend {name!r} (known: {known})")


def available_backends() -> list[str]:
    """Every backend name: built-ins, registered ones, and entry points."""
    names = set(_registry) | set(_BUILTINS)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def create_backend(kind: str, /, **options: Any) -> Backend:
    """Build a backend of kind ``kind`` (``"block"``...) with ``options``
    (e.g. ``name=``, ``path=``, ``read_only=``).

    Raises:
        ConfigError: unknown backend, or options it does not accept / reject
            (the message names the backend and the problem).
    """
    factory = _lookup(kind)
    try:
        return factory(**options)
    except TypeError as e:
        raise ConfigError(f"backend {kind!r}: bad options {sorted(options)}: {e}") from e
    except (ValueError, OSError) as e:
        raise ConfigError(f"backend {kind!r}: {e}") from e
