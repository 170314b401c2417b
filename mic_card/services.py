"""What card code may use of the card OS: the :class:`CardServices` protocol.

The bottom of ``mic_card``'s own layers. The shell, the agent, the offload
endpoint, the accelerator framework and users' card apps depend on this
protocol, never on the card OS object (``mic_card.card``), which is the
composition root that nothing imports. The same seam as
``mic_host.backends.BackendContext`` on the host side.

Imports only ``virtio`` and ``transport`` (for types); nothing from ``mic_card``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from transport import Region
from transport.messages import SHUTDOWN_STATUSES
from virtio.memory import Memory

__all__ = ["SHUTDOWN_STATUSES", "CardServices"]


class CardServices(Protocol):
    """The card OS as card code sees it (``async def main(card)`` gets one).

    - devices: ``devices()`` lists the bus's devices (``name``, ``type``,
      ``driver``, ``state``...), ``device(name)`` is the bound driver
      (a ``BlockDevice``, ``ConsoleDevice``, ``NetDevice``...);
    - memory: ``memory`` is the card-physical address space, ``card_ram`` the
      card RAM region (its fd can be handed to a host script), ``alloc``/``free``
      hand out card RAM;
    - ``dmesg()``, ``log``, ``uptime``, ``boot_params``, ``shutdown(status)``;
    - ``accelerators()`` starts the accelerator framework on first use.
    """

    @property
    def name(self) -> str: ...

    @property
    def log(self) -> logging.Logger: ...

    @property
    def boot_params(self) -> Mapping[str, Any]: ...

    @property
    def memory(self) -> Memory: ...

    @property
    def card_ram(self) -> Region: ...

    @property
    def uptime(self) -> float: ...

    def devices(self) -> list[dict[str, Any]]:
        """The bus's devices, one dict each (``name``, ``type``, ``driver``, ``state``...)."""
        ...

    def device(self, name: str) -> Any:
        """The driver bound to ``name`` (``vda``, ``hvc0``...).

        Raises:
            LocalProtocolError: no such device (or no driver bound to it).
        """
        ...

    async def wait_device(self, name: str, timeout: float = 10.0) -> Any:
        """The driver bound to ``name`` once it appears (hot-add).

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        ...

    def alloc(self, size: int, align: int = 64) -> int:
        """``size`` bytes of card RAM; returns the card-physical address.

        Raises:
            ResourceError: card RAM is exhausted.
        """
        ...

    def free(self, addr: int) -> None: ...

    def dmesg(self) -> list[str]:
        """The card's recent log lines, oldest first."""
        ...

    def shutdown(self, status: str = "halted") -> None:
        """End the card OS with ``status`` (one of :data:`SHUTDOWN_STATUSES`).

        Raises:
            LocalProtocolError: an unknown status.
        """
        ...

    async def accelerators(self) -> Any:
        """The card's accelerator framework (``mic_card.accel.AccelFramework``),
        started on first use and stopped when the card OS shuts down."""
        ...
