"""The seams between the accelerator framework and its children, as small protocols.

The framework (:mod:`mic_card.accel.framework`) implements them with public
methods; the children (queues, host channels, the management unit) depend
on these protocols only, never on the framework module nor on its private
methods:

- :class:`ServedQueue`: what a device needs of a queue it hands to an engine
  worker (an app's :class:`~mic_card.accel.queue.AccelQueue`, a host script's
  :class:`~mic_card.accel.offload.HostChannel`);
- :class:`QueueOwner`: what a queue needs of its device (attach to a worker,
  detach, release, report a ring fault);
- :class:`ChannelOwner`: what the offload endpoint needs to place a host
  channel on a device (admit, adopt);
- :class:`ManagedDevice`: what the management unit reads and changes.

Imports only :mod:`mic_card.accel.qstate`, :mod:`mic_card.accel.spec` and
:mod:`mic_card.accel.wire`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from mic_card.accel.qstate import QState, QueueStats
from mic_card.accel.spec import DevFlag, DeviceSpec
from mic_card.accel.wire import Alg, QueueGeometry, StatusWord

__all__ = ["ChannelOwner", "ManagedDevice", "QueueOwner", "ServedQueue"]


class ServedQueue(Protocol):
    """What a device needs of a queue it hands to an engine worker."""

    qid: int
    state: QState
    geometry: QueueGeometry
    stats: QueueStats

    @property
    def closed(self) -> bool: ...

    def status_word(self, w: StatusWord) -> int: ...

    def attach_request(self) -> tuple[dict[str, Any], list[int]]:
        """What the worker's ``attach`` needs beyond the geometry (extra fields, fds)."""
        ...

    def fault(self, reason: str) -> None:
        """Disable the queue and fail what is in flight (engine crash/hang, ring error)."""
        ...

    async def reset(self) -> None: ...

    async def aclose(self) -> None: ...


class QueueOwner(Protocol):
    """What a queue needs of its device."""

    @property
    def name(self) -> str: ...

    async def attach(self, q: ServedQueue) -> None:
        """Hand ``q`` to an engine worker of its own (uacce START_Q)."""
        ...

    async def detach(self, q: ServedQueue) -> None:
        """Take ``q`` back from its worker (PUT_Q, reset)."""
        ...

    def released(self, q: ServedQueue) -> None:
        """``q`` is freed: it no longer counts against ``available_instances``."""
        ...

    def ring_fault(self, q: ServedQueue, detail: str) -> None:
        """The driver side found ``q``'s ring broken: count it against the device."""
        ...

    def worker_of(self, q: ServedQueue) -> int | None:
        """pid of the worker serving ``q`` (None if unattached)."""
        ...


class ChannelOwner(QueueOwner, Protocol):
    """A device as the offload endpoint places host channels on it."""

    def admit(self) -> tuple[int, int]:
        """A queue id and a PASID for a new queue.

        Raises:
            QueueBusy, DeviceIsolated, ClosedResourceError: no queue may be opened.
        """
        ...

    def adopt(self, q: ServedQueue) -> None:
        """Count ``q`` (admitted with :meth:`admit`) among the device's queues."""
        ...


class ManagedDevice(Protocol):
    """A device as its management unit sees it."""

    @property
    def name(self) -> str: ...

    @property
    def spec(self) -> DeviceSpec: ...

    @property
    def algs(self) -> frozenset[Alg]: ...

    @property
    def flags(self) -> DevFlag: ...

    @property
    def node_id(self) -> int: ...

    @property
    def isolate(self) -> bool: ...

    @property
    def worker_restarts(self) -> int: ...

    @property
    def queues(self) -> Mapping[int, ServedQueue]: ...

    def fault_count(self) -> int: ...

    def clear_isolation(self) -> None:
        """Forget the fault history and un-isolate the device."""
        ...
