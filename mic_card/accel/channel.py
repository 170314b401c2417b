"""OS glue of the accelerator framework: queue resources and worker processes.

The one module of ``mic_card.accel`` that deals with file descriptors. Regions,
doorbells and fd passing all go through ``transport``'s public API
(:class:`~transport.Region`, :class:`~transport.Mmio`,
:class:`~transport.FramedSocket`); what transport does not offer yet is kept
here in two small functions so it can move there unchanged:

- :func:`spawn_worker` makes a Unix socketpair and starts
  ``python -m mic_card.accel.worker`` with the child end passed by
  ``pass_fds`` (proposed: ``transport.link.spawn_with_link(argv)``);
- :func:`adopt_link` wraps an inherited socket fd in a FramedSocket
  (proposed: ``transport.link.FramedSocket.from_fd``).

A queue's resources are one memfd region (status page, split ring, request
slots, shared heap) and a one-doorbell-each-way :class:`~transport.Mmio`
(its own region and two eventfds): the framework side plays ``Side.HOST``,
the engine worker adopts them as ``Side.CARD``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from mic_card.accel.wire import STATUS_MAGIC, QueueGeometry, StatusWord
from transport import FramedSocket, Mmio, MmioLayout, NotifyPolicy, Region

__all__ = ["QUEUE_MMIO", "QueueResources", "WorkerLink", "adopt_link", "spawn_worker"]

#: one doorbell and one vector each way: app -> engine, engine -> app
QUEUE_MMIO = MmioLayout.single()
_REPO = Path(__file__).resolve().parents[2]


@dataclass(slots=True)
class QueueResources:
    """The app side's region + MMIO of one queue (owned; ``close()`` frees both)."""

    geometry: QueueGeometry
    region: Region
    mmio: Mmio

    @classmethod
    def create(cls, geometry: QueueGeometry, policy: NotifyPolicy) -> QueueResources:
        """Create a zeroed region and a fresh doorbell pair.

        Raises:
            RegionError: the kernel refused the memfd or mapping.
        """
        region = Region.create(f"accel-q{geometry.pasid}", geometry.region_size)
        try:
            w = region.view()[:4096].cast("Q")
            w[StatusWord.MAGIC] = STATUS_MAGIC
            w.release()
            mmio = Mmio.create(QUEUE_MMIO, policy)
        except BaseException:
            region.close()
            raise
        return cls(geometry, region, mmio)

    def renew_mmio(self, policy: NotifyPolicy) -> None:
        """Replace the doorbell pair (after a fault latched the old vectors failed)."""
        old = self.mmio
        self.mmio = Mmio.create(QUEUE_MMIO, policy)
        old.close()

    def fds(self) -> list[int]:
        """fds to hand to the worker: queue region, MMIO region, then the eventfds."""
        return [self.region.fd, self.mmio.region.fd, *self.mmio.eventfds]

    def close(self) -> None:
        self.mmio.close()
        self.region.close()


@dataclass(slots=True)
class WorkerLink:
    proc: asyncio.subprocess.Process
    link: FramedSocket


async def spawn_worker(name: str) -> WorkerLink:
    """Start one engine worker process with a control socket (fds travel over it).

    Raises:
        OSError: the process could not be started.
    """
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mic_card.accel.worker",
            "--fd",
            str(child.fileno()),
            "--name",
            name,
            pass_fds=(child.fileno(),),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return WorkerLink(proc, FramedSocket(parent))


def adopt_link(fd: int) -> FramedSocket:
    """Worker side: the inherited control socket as a FramedSocket."""
    return FramedSocket(socket.socket(fileno=fd))


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
