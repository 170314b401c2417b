"""An engine worker process: the "hardware agent" side of accelerator queues.

Run by the framework as ``python -m mic_card.accel.worker --fd N``; ``N`` is a
Unix socket carrying framed JSON control messages (transport's FramedSocket)
and, with ``attach``, the queue's fds (region, MMIO region, two eventfds).

Messages, framework -> worker: ``attach`` {id, qid, pasid, heap_size, algs,
chaining, inject, spin_ns, mode, region_off?, region_total?} + 4 fds (a
host channel's queue is ``region_off`` bytes into a ``region_total``-byte
region, card RAM); ``detach`` {id, qid}; ``stop`` {id}.
Worker -> framework: ``ready``; ``reply`` {id, ok, error?}; ``fault`` {qid,
kind: "ring"|"access", detail}.

Each attached queue is served by one task: sleep on the doorbell vector
(eventfd, poll or hybrid, ``transport.notify``), then drain the ring through
:class:`~mic_card.accel.engine.QueueServer` with notifications disabled, and
ring the app's vector when the ring core says it wants an interrupt. A worker
serves its queues one request at a time, like one hardware engine. Injected
crashes exit the process; injected hangs stop answering (the framework's
watchdog kills the worker).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

from mic_card.accel.channel import QUEUE_MMIO, adopt_link, close_fds
from mic_card.accel.engine import EngineConfig, InjectedCrash, InjectedHang, QueueServer
from mic_card.accel.wire import Alg, QueueGeometry, StatusWord
from transport import FramedSocket, LinkLost, Mmio, NotifyMode, NotifyPolicy, Region
from virtio.errors import MicError
from virtio.memory import FlatMemory
from virtio.split import RingError

CRASH_EXIT = 70
#: requests served between two publications of the used ring (and interrupts):
#: the app reaps the first completions of a batch while the engine does the rest
SERVE_BATCH = 8


@dataclass(slots=True)
class _Queue:
    qid: int
    region: Region
    mmio: Mmio
    server: QueueServer
    task: asyncio.Task[None] | None = None

    def close(self) -> None:
        self.server.words.release()
        self.mmio.close()
        self.region.close()


def _hang() -> None:
    """Stop answering until killed (or until the framework's process is gone)."""
    ppid = os.getppid()
    while os.getppid() == ppid:
        time.sleep(0.2)
    os._exit(CRASH_EXIT + 1)


class Worker:
    def __init__(self, link: FramedSocket) -> None:
        self.link = link
        self.queues: dict[int, _Queue] = {}

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            await self.link.send_frame({"type": "ready", "pid": os.getpid()})
            while True:
                try:
                    msg, fds = await self.link.recv_frame()
                except (LinkLost, MicError):
                    break
                reply: dict[str, Any] = {"type": "reply", "id": msg.get("id"), "ok": True}
                try:
                    kind = msg.get("type")
                    if kind == "attach":
                        q = self._attach(msg, fds)
                        q.task = tg.create_task(self._serve(q))
                    elif kind == "detach":
                        close_fds(fds)
                        await self._detach(int(msg["qid"]))
                    elif kind == "stop":
                        close_fds(fds)
                        await self.link.send_frame(reply)
                        break
                    else:
                        close_fds(fds)
                        raise ValueError(f"unknown message {kind!r}")
                except (MicError, ValueError, KeyError, TypeError, OSError) as e:
                    reply = {"type": "reply", "id": msg.get("id"), "ok": False, "error": str(e)}
                await self.link.send_frame(reply)
            for qid in list(self.queues):
                await self._detach(qid)
        self.link.close()

    def _attach(self, msg: dict[str, Any], fds: list[int]) -> _Queue:
        if len(fds) != 4:
            close_fds(fds)
            raise ValueError(f"attach needs 4 fds, got {len(fds)}")
        qid = int(msg["qid"])
        geo = QueueGeometry(int(msg["pasid"]), int(msg["heap_size"]))
        policy = NotifyPolicy(NotifyMode(int(msg.get("mode", 2))), spin_ns=int(msg["spin_ns"]))
        # A queue has its own region, or (a host channel) lives at region_off
        # inside a bigger one (card RAM) that the worker maps whole.
        off = int(msg.get("region_off", 0))
        total = int(msg.get("region_total", geo.region_size))
        if off < 0 or off % 4096 or off + geo.region_size > total:
            close_fds(fds)
            raise ValueError(f"queue region at {off:#x} does not fit in {total} B")
        try:
            region = Region.adopt(f"accel-q{geo.pasid}", fds[0], total)
        except BaseException:
            close_fds(fds[1:])
            raise
        try:
            mreg = Region.adopt("accel-mmio", fds[1], QUEUE_MMIO.size)
        except BaseException:
            region.close()
            close_fds(fds[2:])
            raise
        try:
            mmio = Mmio.adopt(mreg, QUEUE_MMIO, (fds[2],), (fds[3],), policy)
        except BaseException:
            region.close()
            raise
        try:
            whole = region.view()[off : off + geo.region_size]
            ring_mem = FlatMemory(whole, base=geo.base)
            # requests address the heap only (the PASID check)
            lo = geo.heap_off
            data_mem = FlatMemory(whole[lo : geo.region_size], base=geo.base + lo)
            cfg = EngineConfig(
                frozenset(Alg(a) for a in msg["algs"]),
                chaining=bool(msg.get("chaining", True)),
                allow_inject=bool(msg.get("inject", False)),
            )
            server = QueueServer(ring_mem, geo.layout, data_mem, cfg, whole[:4096].cast("Q"))
        except BaseException:
            mmio.close()
            region.close()
            raise
        q = _Queue(qid, region, mmio, server)
        old = self.queues.pop(qid, None)
        if old is not None:  # pragma: no cover - the framework detaches first
            old.close()
        self.queues[qid] = q
        return q

    async def _detach(self, qid: int) -> None:
        q = self.queues.pop(qid, None)
        if q is None:
            return
        if q.task is not None:
            q.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await q.task
        q.close()

    async def _serve(self, q: _Queue) -> None:
        vec = q.mmio.vector(0)
        db = q.mmio.doorbell(0)
        server = q.server
        dq = server.dq
        words = server.words
        clock = time.monotonic_ns
        while True:
            await vec.wait()
            words[StatusWord.HEARTBEAT] += 1
            dq.disable_notifications()
            while True:
                faults = words[StatusWord.ACCESS_FAULTS]
                try:
                    n, irq = server.serve(clock, SERVE_BATCH)
                except RingError as e:
                    await self._fault(q.qid, "ring", e.reason)
                    return
                except InjectedCrash:
                    os._exit(CRASH_EXIT)
                except InjectedHang:
                    _hang()
                if irq:
                    db.ring()
                if words[StatusWord.ACCESS_FAULTS] != faults:
                    await self._fault(
                        q.qid, "access", str(words[StatusWord.ACCESS_FAULTS] - faults)
                    )
                if n:
                    await asyncio.sleep(0)  # let this worker's other queues run
                    continue
                if dq.enable_notifications():
                    dq.disable_notifications()
                    continue
                break

    async def _fault(self, qid: int, kind: str, detail: str) -> None:
        with contextlib.suppress(LinkLost, MicError, OSError):
            await self.link.send_frame(
                {"type": "fault", "qid": qid, "kind": kind, "detail": detail}
            )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mic-accel-worker")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--name", default="accel")
    args = ap.parse_args(argv)
    asyncio.run(Worker(adopt_link(args.fd)).run())


if __name__ == "__main__":
    main()
