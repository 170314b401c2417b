"""The ``mic`` provider: sessions on the card's accelerator queues (priority 100).

Keeps, per device, a small pool of started queues shared by its sessions
(UADK's per-process "ctx config": one queue per engine worker, so stateless
requests spread over the workers round robin). Extensions when imported
directly: :meth:`MicProvider.queues` (the pool itself, for zero-copy
``alloc`` or raw ``submit``), :meth:`MicProvider.open_session` with
``queues=`` / ``device=``, and :meth:`MicProvider.stats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mic_card.accel.errors import NoProvider
from mic_card.accel.queue import AccelQueue, QState
from mic_card.accel.session import Session, SessionLike, SessionSpec

if TYPE_CHECKING:
    from mic_card.accel.api import Accelerator, Accelerators

__all__ = ["MicProvider", "factory"]


class MicProvider:
    """The card's hardware (worker-process engines)."""

    name = "mic"
    priority = 100

    def __init__(self, framework: Accelerators) -> None:
        self.fw = framework
        self._pools: dict[str, list[AccelQueue]] = {}

    def supports(self, alg: str) -> bool:
        return bool(self.fw.find(alg))

    async def queues(self, device: Accelerator) -> list[AccelQueue]:
        """The started queues this provider shares on ``device`` (opened on first use).

        Raises:
            QueueBusy, DeviceIsolated: from ``device.open()`` when none could be opened.
        """
        pool = [q for q in self._pools.get(device.name, []) if q.state is QState.STARTED]
        want = device.spec.workers
        try:
            while len(pool) < want:
                q = await device.open()
                try:
                    await q.start()
                except BaseException:
                    await q.aclose()
                    raise
                pool.append(q)
        except Exception:
            if not pool:
                raise
        self._pools[device.name] = pool
        return pool

    async def open_session(
        self,
        spec: SessionSpec,
        *,
        device: Accelerator | None = None,
        queues: Sequence[AccelQueue] | None = None,
    ) -> SessionLike:
        """A session on this provider's queues (or on ``queues`` / ``device``).

        Raises:
            NoProvider: no device offers the algorithm.
            QueueBusy, DeviceIsolated: no queue could be had.
        """
        if queues is None:
            if device is None:
                devs = self.fw.find(spec.alg)
                if not devs:
                    raise NoProvider(f"no card accelerator offers {spec.alg!r}")
                err: Exception | None = None
                for d in devs:
                    try:
                        queues = await self.queues(d)
                        break
                    except Exception as e:  # busy or isolated: try the next device
                        err = e
                if queues is None:
                    assert err is not None
                    raise err
            else:
                queues = await self.queues(device)
        return Session(queues, spec)

    def stats(self) -> dict[str, Any]:
        return {name: [q.stats for q in pool] for name, pool in self._pools.items()}

    async def aclose(self) -> None:
        for pool in self._pools.values():
            for q in pool:
                await q.aclose()
        self._pools.clear()


def factory(framework: Accelerators | None) -> MicProvider | None:
    """Entry-point factory (None without a running framework)."""
    return None if framework is None else MicProvider(framework)
