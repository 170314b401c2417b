"""The accelerator framework as its users see it: :class:`Accelerators` and :class:`Accelerator`.

Providers (:mod:`mic_card.accel.providers`), the shell's tools
(:mod:`mic_card.accel.tools`) and the offload endpoint
(:mod:`mic_card.accel.offload`) depend on these protocols; the framework
(:mod:`mic_card.accel.framework`) implements them. Imports the queue and the
owner protocols; never the framework.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from mic_card.accel.owner import ChannelOwner
from mic_card.accel.queue import AccelQueue
from mic_card.accel.spec import DeviceSpec

__all__ = ["Accelerator", "Accelerators"]


class Accelerator(ChannelOwner, Protocol):
    """One device (a uacce device) as its users see it."""

    @property
    def spec(self) -> DeviceSpec: ...

    @property
    def isolate(self) -> bool: ...

    @property
    def algorithms(self) -> tuple[str, ...]: ...

    def attrs(self) -> dict[str, Any]:
        """The sysfs-like attribute set (``accel list``)."""
        ...

    def fault_count(self) -> int:
        """Faults in the last hour."""
        ...

    async def open(self) -> AccelQueue:
        """A new queue in state INIT.

        Raises:
            QueueBusy, DeviceIsolated, ClosedResourceError: no queue may be opened.
        """
        ...


class Accelerators(Protocol):
    """The framework as its users see it: the devices, and which offer what."""

    @property
    def devices(self) -> Mapping[str, Accelerator]: ...

    def find(self, alg: str, node: int | None = None) -> Sequence[Accelerator]:
        """Devices offering ``alg``, usable ones first (``wd_get_accel_list``)."""
        ...
