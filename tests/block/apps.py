"""Card apps of the block tests and benchmark (``tests.block.apps:fn``), run inside ``mic-card``.

Results must be JSON-ready (bytes come back hex-encoded). The write storm's
on-disk format is shared with the host-side checker in
:mod:`tests.block.storm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import traceback
from pathlib import Path
from typing import Any

from mic_card.drivers.block import BlockDevice, BlockIOError
from mic_card.services import CardServices
from tests.block import storm
from virtio.errors import BrokenResourceError, MicError

SECTOR = 512


def _note(path: str, text: str) -> None:
    Path(path).write_text(text)


def _blk(card: CardServices, dev: str) -> BlockDevice:
    d = card.device(dev)
    assert isinstance(d, BlockDevice)
    return d


async def info(card: CardServices, dev: str) -> dict[str, Any]:
    """``BlockDevice.info()`` plus the serial (what ``blkinfo`` will print)."""
    blk = _blk(card, dev)
    return blk.info() | {"serial": (await blk.get_id()).decode()}


async def apply_ops(card: CardServices, dev: str, ops: list[list[Any]]) -> list[Any]:
    """Run ``ops`` in order: ``["w", sector, hex]``, ``["r", sector, count]``,
    ``["z", sector, count]`` (write_zeroes), ``["d", sector, count]`` (discard),
    ``["f"]`` (flush). Each answer: hex data for reads, "ok", or the error's
    class name and status."""
    blk = _blk(card, dev)
    out: list[Any] = []
    for op in ops:
        try:
            if op[0] == "w":
                await blk.write(op[1], bytes.fromhex(op[2]))
                out.append("ok")
            elif op[0] == "r":
                out.append((await blk.read(op[1], op[2])).hex())
            elif op[0] == "z":
                await blk.write_zeroes(op[1], op[2])
                out.append("ok")
            elif op[0] == "d":
                await blk.discard(op[1], op[2])
                out.append("ok")
            else:
                await blk.flush()
                out.append("ok")
        except BlockIOError as e:
            out.append(["BlockIOError", e.status])
    return out


async def concurrent_ops(card: CardServices, dev: str, ops: list[list[Any]]) -> list[Any]:
    """Like :func:`apply_ops`, but every op is in flight at once (ops must not overlap)."""
    blk = _blk(card, dev)

    async def one(op: list[Any]) -> Any:
        if op[0] == "w":
            await blk.write(op[1], bytes.fromhex(op[2]))
            return "ok"
        return (await blk.read(op[1], op[2])).hex()

    return list(await asyncio.gather(*(one(op) for op in ops)))


async def queue_use(card: CardServices, dev: str, n: int) -> dict[str, Any]:
    """``n`` concurrent 4 KiB reads; how many requests each queue carried."""
    blk = _blk(card, dev)
    before = [q.submitted for q in blk.queues]
    await asyncio.gather(*(blk.read(8 * (i % 64), 8) for i in range(n)))
    return {
        "num_queues": blk.num_queues,
        "per_queue": [q.submitted - b for q, b in zip(blk.queues, before, strict=True)],
    }


async def refusals(card: CardServices, dev: str) -> dict[str, Any]:
    """What a read-only device / out-of-range requests answer (status per attempt)."""
    blk = _blk(card, dev)
    res: dict[str, Any] = {"read_only": blk.read_only}
    attempts = {
        "write": blk.write(0, b"x" * SECTOR),
        "write_zeroes": blk.write_zeroes(0, 1),
        "discard": blk.discard(0, 1),
        "read_past_end": blk.read(blk.capacity - 1, 2),
        "read_far": blk.read(1 << 62, 1),
        "write_past_end": blk.write(blk.capacity, b"y" * SECTOR),
    }
    for name, coro in attempts.items():
        try:
            await coro
            res[name] = "ok"
        except BlockIOError as e:
            res[name] = e.status
    await blk.flush()  # allowed on a read-only device
    res["first"] = (await blk.read(0, 1))[:16].hex()
    return res


async def digest(card: CardServices, dev: str) -> str:
    """sha256 of the whole device, read in 1 MiB requests at depth 8."""
    blk = _blk(card, dev)
    step = 2048
    h = hashlib.sha256()
    sem = asyncio.Semaphore(8)

    async def rd(s: int) -> bytes:
        async with sem:
            return await blk.read(s, min(step, blk.capacity - s))

    tasks = [asyncio.ensure_future(rd(s)) for s in range(0, blk.capacity, step)]
    for t in tasks:
        h.update(await t)
    return h.hexdigest()


async def io_until_removed(card: CardServices, dev: str, seconds: float) -> dict[str, Any]:
    """Reads and writes at depth 16 until the device goes away (or ``seconds``);
    counts what succeeded and what failed, and how."""
    blk = _blk(card, dev)
    ok = 0
    errors: dict[str, int] = {}
    messages: set[str] = set()
    deadline = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal ok
        while time.monotonic() < deadline:
            try:
                if i % 2:
                    await blk.write(8 * i, bytes([i]) * 4096)
                else:
                    await blk.read(8 * i, 8)
                ok += 1
            except MicError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                messages.add(str(e))
                if isinstance(e, BrokenResourceError):
                    return

    await asyncio.gather(*(worker(i) for i in range(16)))
    return {"ok": ok, "errors": errors, "messages": sorted(messages)[:5]}


async def write_storm(
    card: CardServices, dev: str, journal: str, seed: int, depth: int, limit: int, side_file: str
) -> dict[str, Any]:
    """Random 4 KiB writes at ``depth`` on ``dev``, a FLUSH every few ms; after each
    completed FLUSH, the acknowledged prefix it covers is recorded in sector 0
    of ``journal`` (see :mod:`tests.block.storm`). Runs until ``limit`` writes
    or until killed; what the app saw when it ended goes to ``side_file``.
    """
    blk = _blk(card, dev)
    jdev = _blk(card, journal)
    nblocks = blk.capacity // storm.BLOCK_SECTORS
    plan = storm.Plan(seed, nblocks)
    acked: set[int] = set()
    prefix = 0  # every seq < prefix is acknowledged
    nxt = 0
    epoch = 0
    done = asyncio.Event()
    last: dict[int, asyncio.Future[None]] = {}  # block -> its latest write's completion

    async def writer() -> None:
        nonlocal nxt, prefix
        while nxt < limit:
            seq = nxt
            nxt += 1
            block = plan.block(seq)
            # Writes to one block go one at a time, in seq order: two in flight
            # at once would have no defined order (a device may run them either
            # way), as on any disk.
            before = last.get(block)
            mine = last[block] = asyncio.get_running_loop().create_future()
            try:
                if before is not None:
                    await asyncio.shield(before)
                await blk.write(block * storm.BLOCK_SECTORS, storm.block_bytes(seed, seq, block))
            finally:
                mine.set_result(None)
                if last.get(block) is mine:
                    del last[block]
            acked.add(seq)
            while prefix in acked:
                acked.discard(prefix)
                prefix += 1

    async def flusher() -> None:
        nonlocal epoch
        while not done.is_set():
            await asyncio.sleep(0.005)
            covered = prefix  # acknowledged before this FLUSH was sent
            await blk.flush()
            epoch += 1
            await jdev.write(0, storm.journal_record(seed, epoch, covered))
            await jdev.flush()

    ft = asyncio.ensure_future(flusher())
    try:
        await asyncio.gather(*(writer() for _ in range(depth)))
        done.set()
        await ft
        _note(side_file, "finished\n")
        return {"writes": nxt, "prefix": prefix, "epoch": epoch}
    except BaseException as e:
        _note(side_file, f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise
    finally:
        ft.cancel()
        with contextlib.suppress(BaseException):
            await ft


async def cancel_storm(card: CardServices, dev: str, rounds: int) -> dict[str, Any]:
    """Deep concurrent reads of 4 KiB blocks whose content names their block (the
    test writes them), a third of them cancelled while in flight; every read that
    completes must return its own block (two requests sharing a header slot would
    read each other's sectors), and every header slot must come back."""
    blk = _blk(card, dev)
    nblocks = min(blk.capacity // 8, 256)
    wrong: list[int] = []
    completed = cancelled = 0

    async def one(b: int) -> None:
        nonlocal completed
        data = await blk.read(b * 8, 8)
        if data[:8] != b.to_bytes(8, "little"):
            wrong.append(b)
        completed += 1

    for r in range(rounds):
        tasks = [asyncio.ensure_future(one((r * 97 + i * 13) % nblocks)) for i in range(96)]
        await asyncio.sleep(0)  # submitted, not answered yet
        for t in tasks[::3]:
            t.cancel()
        for res in await asyncio.gather(*tasks, return_exceptions=True):
            cancelled += isinstance(res, asyncio.CancelledError)
    # A cancelled request's slot comes back when the host answers it: wait for that
    # (bounded), a read answered after its canceller returned is still counted here.
    deadline = time.monotonic() + 30
    while sum(q.outstanding for q in blk.queues) and time.monotonic() < deadline:  # noqa: ASYNC110 (no event for it)
        await asyncio.sleep(0.01)
    slots = blk._slots
    return {
        "completed": completed,
        "cancelled": cancelled,
        "wrong": wrong,
        "slots": None if slots is None else len(slots.free),
        "slots_total": sum(ep.size for ep in blk.dev.endpoints),
        "outstanding": sum(q.outstanding for q in blk.queues),
    }
