"""A card process for the transport tests: ``python -m tests.transport.card_proc PATH``.

Connects to the host at PATH and executes commands the host sends on the
message link (one reply per command), so each test drives a real second
process. Also usable as a host process (``--host``) for the "host dies" test.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from typing import Any

from transport import (
    DmaError,
    LinkLost,
    NotifyMode,
    NotifyPolicy,
    PcieCard,
    PcieConfig,
    PcieHost,
)
from virtio.memory import MemoryFault


def policy(msg: dict[str, Any]) -> NotifyPolicy:
    return NotifyPolicy(
        mode=NotifyMode[msg.get("mode", "HYBRID").upper()],
        spin_ns=int(msg.get("spin_ns", 50_000)),
    )


async def pingpong(card: PcieCard, msg: dict[str, Any]) -> dict[str, Any]:
    """Wait on vector ``vec``, ring doorbell ``db``; ``rounds`` times."""
    vec = card.mmio.vector(msg.get("vec", 0))
    vec.policy = policy(msg)
    db = card.mmio.doorbell(msg.get("db", 0))
    total = 0
    for _ in range(msg["rounds"]):
        total += await vec.wait()
        db.ring()
    return {"ok": True, "events": total, "sleeps": vec.sleeps, "spin": vec.wakeups_spin}


async def execute(card: PcieCard, msg: dict[str, Any]) -> dict[str, Any]:
    op = msg["op"]
    sp = card.space
    try:
        if op == "read":
            return {"ok": True, "data": bytes(sp.view(msg["addr"], msg["len"])).hex()}
        if op == "write":
            data = bytes.fromhex(msg["data"])
            sp.view(msg["addr"], len(data), write=True)[:] = data
            return {"ok": True}
        if op == "sha256":
            return {
                "ok": True,
                "sha256": hashlib.sha256(sp.view(msg["addr"], msg["len"])).hexdigest(),
            }
        if op == "fill":
            v = sp.view(msg["addr"], msg["len"], write=True)
            pattern = bytes(range(256)) * (msg["len"] // 256 + 1)
            v[:] = pattern[msg.get("shift", 0) : msg.get("shift", 0) + msg["len"]]
            return {"ok": True}
        if op == "spad":
            return {"ok": True, "dp": card.mmio.spad.device_page(), "spad0": card.mmio.spad.read(0)}
        if op == "info":
            return {
                "ok": True,
                "boot": card.boot_params,
                "card": card.identity.name,
                "pid": os.getpid(),
                "faults": sp.faults.count,
            }
        if op == "pingpong":
            return await pingpong(card, msg)
        if op == "ring":
            for _ in range(msg.get("n", 1)):
                card.mmio.doorbell(msg["db"]).ring()
            return {"ok": True}
        if op == "dma":
            async with card.dma() as dma:
                comp = await dma.copy(msg["dst"], msg["src"], msg["len"])
            return {"ok": True, "path": int(comp.path)}
        if op == "wait_vec":
            card.mmio.vector(msg["vec"]).policy = policy(msg)
            n = await card.mmio.vector(msg["vec"]).wait()
            return {"ok": True, "n": n}
        if op == "echo":
            return {"ok": True, "echo": msg.get("payload")}
    except MemoryFault as e:
        return {"ok": False, "fault": str(e), "faults": sp.faults.count}
    except DmaError as e:
        return {"ok": False, "dma_error": type(e).__name__, "msg": str(e)}
    return {"ok": False, "error": f"unknown op {op!r}"}


async def card_main(path: str) -> int:
    async with PcieCard.connect(path) as card:
        link = card.link
        while True:
            try:
                msg = await link.recv()
            except LinkLost:
                return 3
            if msg.get("op") == "exit":
                await link.send({"ok": True})
                return 0
            if msg.get("op") == "hang":
                await asyncio.sleep(3600)
            await link.send(await execute(card, msg))


async def host_main(path: str) -> int:
    """Be a host for a card living in the test process; then wait to be killed."""
    cfg = PcieConfig(card_ram_size=1 << 20, host_ram_size=1 << 20)
    async with PcieHost(path, config=cfg, boot_params={"role": "host-proc"}) as host:
        host.smpt.open(0, 1 << 20)
        link = await host.accept()
        await link.send({"hello": "from host"})
        await asyncio.sleep(3600)
    return 0


def main() -> int:
    path = sys.argv[1]
    if len(sys.argv) > 2 and sys.argv[2] == "--host":
        return asyncio.run(host_main(path))
    return asyncio.run(card_main(path))


if __name__ == "__main__":
    sys.exit(main())
