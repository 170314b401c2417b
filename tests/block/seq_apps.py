"""Card app of the sequential-I/O tests (``tests.block.seq_apps:fn``), run inside ``mic-card``."""

from __future__ import annotations

import asyncio
from typing import Any

from mic_card.drivers.block import BlockDevice
from mic_card.services import CardServices

MiB = 1 << 20
SECTORS = MiB // 512


async def deep_big_reads(card: CardServices, dev: str, depth: int, rounds: int) -> dict[str, Any]:
    """``depth`` workers, each reading whole MiBs into its own DMA buffer, ``rounds``
    passes over the disk; every MiB of the image is filled with its index as a u64.
    Returns the MiBs that read back wrong and how many reads completed."""
    blk = card.device(dev)
    assert isinstance(blk, BlockDevice)
    n = blk.capacity // SECTORS
    todo = [m for _ in range(rounds) for m in range(n)]
    wrong: list[int] = []
    done = 0

    async def worker() -> None:
        nonlocal done
        with blk.buffer(MiB) as buf:
            while todo:
                m = todo.pop()
                buf.view[:8] = b"\xff" * 8  # a stale buffer must not pass
                await blk.read_into(m * SECTORS, buf)
                if bytes(buf.view) != m.to_bytes(8, "little") * (MiB // 8):
                    wrong.append(m)
                done += 1

    await asyncio.gather(*(worker() for _ in range(depth)))
    return {"wrong": wrong, "done": done}
