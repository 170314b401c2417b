"""What the device side of either ring keeps and checks the same way.

Owns :class:`DeviceQueueBase`, the common part of :class:`virtio.split.DeviceQueue`
and :class:`virtio.packed.DeviceQueue`: the negotiated features, the caller's
chain requirements, the broken latch and the DRIVER_OK gate, and the first
check of the layout the driver gave (:meth:`_setup`). Each ring maps and walks
its own memory.

Imports ``virtio.split.faults`` and ``virtio.constants/errors/memory``;
must not import asyncio, the OS or ``transport``.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from mypy_extensions import mypyc_attr

from virtio.constants import VRING_SIZE_MAX, Feature
from virtio.errors import LocalProtocolError
from virtio.memory import Memory
from virtio.split.faults import QueueBroken, RingError, RingFault

__all__ = ["DeviceQueueBase"]


class _Layout(Protocol):
    @property
    def size(self) -> int: ...

    def problem(self, max_size: int = VRING_SIZE_MAX) -> tuple[RingFault, str] | None: ...


L = TypeVar("L", bound=_Layout)


# subclassed by interpreted code (mic_host.vhost_user.inflight.TrackedQueue)
@mypyc_attr(allow_interpreted_subclasses=True)
class DeviceQueueBase(Generic[L]):
    """The state both device queues share; see the subclasses."""

    __slots__ = (
        "_mem",
        "broken",
        "errors",
        "event_idx",
        "indirect",
        "layout",
        "notify_enabled",
        "ready",
        "require_readable",
        "require_writable",
        "size",
    )

    def _setup(
        self,
        mem: Memory,
        layout: L,
        features: int,
        max_size: int,
        require_readable: bool,
        require_writable: bool,
    ) -> None:
        """Take the features and requirements, then check ``layout``.

        Raises:
            RingError: the layout breaks a rule (bad size, misaligned part).
        """
        self.layout = layout
        self.size = layout.size
        self.event_idx = bool(features & Feature.EVENT_IDX)
        self.indirect = bool(features & Feature.INDIRECT_DESC)
        self.require_readable = require_readable
        self.require_writable = require_writable
        self.broken = False
        self.errors = 0
        self.ready = False
        self.notify_enabled = True
        self._mem = mem
        bad = layout.problem(max_size)
        if bad is not None:
            self._fail(*bad)

    # -- lifecycle ---------------------------------------------------------
    def activate(self) -> None:
        """Allow consumption; call on DRIVER_OK (§3.1.1: none before it)."""
        self.ready = True

    # -- errors ------------------------------------------------------------
    def _fail(self, fault: RingFault, message: str) -> None:
        self.broken = True
        self.errors += 1
        raise RingError(fault, message)

    def _check_usable(self) -> None:
        if self.broken:
            raise QueueBroken("queue is broken after a ring error; reset the device")
        if not self.ready:
            raise LocalProtocolError("queue not activated: no buffer is used before DRIVER_OK")
