"""virtio-blk throughput: card-side I/O through the whole stack against local file I/O.

Measured in one run, on one image file:

- ``local``: the host process reading/writing the image directly
  (``os.preadv``/``os.pwritev`` into a preallocated buffer, one request at a
  time: page-cache I/O gains nothing from queue depth in one Python thread);
- ``card``: a card app (``bench.block:card_io``, run inside ``mic-card``)
  driving ``/dev/vda`` through the virtio-blk driver, the rings, the doorbells
  and the host backend: sequential 1 MiB reads and writes at queue depth 8,
  random 4 KiB reads and writes at depth 32; zero-copy (DMA buffers) and, for
  reads, buffered (``read() -> bytes``);
- ``host_io``: the backend's candidate data paths, in process: ``os.preadv``
  inline, ``os.preadv`` in a worker thread, ``aiofiles``, and the transport
  DMA engine through a host bounce buffer (mpssd's path).

Target (issue "virtio-block end to end"): sequential card reads >= 0.7x local.
Run: ``python -m bench.block [--quick]``; writes ``bench/results/block.json``.

The module imports only the standard library at the top, so the card process
can import :func:`card_io` without pulling in the host side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import config

RESULTS = Path(__file__).with_name("results") / "block.json"
MiB = 1 << 20
PATTERNS = (
    ("seqread", MiB, 8),
    ("seqwrite", MiB, 8),
    ("randread", 4096, 32),
    ("randwrite", 4096, 32),
)


# ----------------------------------------------------------------- card side


async def card_io(
    card: Any, dev: str, pattern: str, bs: int, depth: int, seconds: float, zero_copy: bool
) -> dict[str, Any]:
    """Card app: ``pattern`` with ``bs``-byte requests at queue depth ``depth`` for
    ``seconds``. ``zero_copy``: DMA buffers (``read_into``/``write`` of a
    ``DmaBuffer``), else bytes in and out."""
    blk = card.device(dev)
    sectors = bs // 512
    nblocks = blk.capacity // sectors
    rng = random.Random(1)
    pos = 0
    ops = 0
    payload = bytes(range(256)) * (bs // 256)
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal pos, ops
        buf = blk.buffer(bs) if zero_copy else None
        if buf is not None:
            buf.view[:] = payload
        try:
            while time.perf_counter() < stop:
                if pattern.startswith("seq"):
                    b, pos = pos, (pos + 1) % nblocks
                else:
                    b = rng.randrange(nblocks)
                if "read" in pattern:
                    if buf is not None:
                        await blk.read_into(b * sectors, buf)
                    else:
                        await blk.read(b * sectors, sectors)
                else:
                    await blk.write(b * sectors, buf if buf is not None else payload)
                ops += 1
        finally:
            if buf is not None:
                buf.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(depth)))
    return {"ops": ops, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------- host side


def make_image(path: Path, size: int) -> None:
    chunk = os.urandom(MiB)
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    path.read_bytes()  # warm the page cache: both sides read from it


def local(path: Path, pattern: str, bs: int, seconds: float) -> dict[str, Any]:
    fd = os.open(path, os.O_RDWR)
    buf = bytearray(os.urandom(bs))
    nblocks = os.fstat(fd).st_size // bs
    rng = random.Random(1)
    ops = pos = 0
    t0 = time.perf_counter()
    stop = t0 + seconds
    try:
        while time.perf_counter() < stop:
            for _ in range(16):
                if pattern.startswith("seq"):
                    b, pos = pos, (pos + 1) % nblocks
                else:
                    b = rng.randrange(nblocks)
                if "read" in pattern:
                    os.preadv(fd, [buf], b * bs)
                else:
                    os.pwritev(fd, [buf], b * bs)
                ops += 1
        return {"ops": ops, "seconds": time.perf_counter() - t0}
    finally:
        os.close(fd)


def _rates(r: dict[str, Any], bs: int) -> dict[str, float]:
    return {
        "mb_s": round(r["ops"] * bs / r["seconds"] / 1e6, 1),
        "iops": round(r["ops"] / r["seconds"]),
    }


async def host_io(path: Path, seconds: float) -> dict[str, Any]:
    """The backend's candidate data paths, reading into shared memory (a memfd)."""
    import mmap

    import aiofiles

    from transport.dma import DmaEngine, DmaPolicy
    from virtio.memory import FlatMemory

    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    mfd = os.memfd_create("bench-card-ram")
    os.ftruncate(mfd, 64 * MiB)
    shm = mmap.mmap(mfd, 64 * MiB)
    mem = FlatMemory(memoryview(shm))
    out: dict[str, Any] = {}

    async def timed(name: str, bs: int, op: Any) -> None:
        n = 0
        nblocks = size // bs
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            await op((n % nblocks) * bs, bs)
            n += 1
        out.setdefault(name, {})[str(bs)] = _rates(
            {"ops": n, "seconds": time.perf_counter() - t0}, bs
        )

    card_buf = mem.view(0, MiB, True)

    async def inline(off: int, bs: int) -> None:
        os.preadv(fd, [card_buf[:bs]], off)

    async def threaded(off: int, bs: int) -> None:
        await asyncio.to_thread(os.preadv, fd, [card_buf[:bs]], off)

    async with aiofiles.open(path, "rb", buffering=0) as af:

        async def via_aiofiles(off: int, bs: int) -> None:
            await af.seek(off)
            await af.readinto(card_buf[:bs])

        async with DmaEngine(mem, DmaPolicy(thread_threshold=256 * 1024)) as dma:
            bounce = 32 * MiB  # host bounce buffer, then DMA into "card RAM" at 0
            bounce_view = mem.view(bounce, MiB, True)

            async def via_dma(off: int, bs: int) -> None:
                os.preadv(fd, [bounce_view[:bs]], off)
                await dma.copy(0, bounce, bs)

            for bs in (4096, MiB):
                await timed("preadv_inline", bs, inline)
                await timed("preadv_thread", bs, threaded)
                await timed("aiofiles", bs, via_aiofiles)
                await timed("dma_bounce", bs, via_dma)
    os.close(mfd)  # the mapping lives on until the views are collected
    os.close(fd)
    return out


async def card_side(
    image: Path, seconds: float, runs: int, nq: int
) -> dict[tuple[str, bool], dict[str, Any]]:
    import mic_host

    out: dict[tuple[str, bool], dict[str, Any]] = {}
    sd = tempfile.mkdtemp(prefix="micb", dir="/tmp")
    async with mic_host.launch(sd, config.card(config.block(image, num_queues=nq))) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=60)
        cells = [(p, bs, d, True) for p, bs, d in PATTERNS] + [("seqread", MiB, 8, False)]
        for pattern, bs, depth, zc in cells:
            best: list[dict[str, Any]] = []
            for _ in range(runs):
                r = await card.run("bench.block:card_io", "vda", pattern, bs, depth, seconds, zc)
                best.append(r["value"])
            med = sorted(best, key=lambda r: r["ops"] / r["seconds"])[len(best) // 2]
            out[(pattern, zc)] = med
    return out


async def amain(quick: bool) -> dict[str, Any]:
    seconds = 0.5 if quick else 2.0
    runs = 1 if quick else 3
    size = 64 * MiB if quick else 256 * MiB
    tmp = Path(tempfile.mkdtemp(prefix="micb", dir="/tmp"))
    image = tmp / "bench.img"
    make_image(image, size)
    try:
        locals_: dict[str, dict[str, Any]] = {}
        for pattern, bs, _ in PATTERNS:
            rs = [local(image, pattern, bs, seconds) for _ in range(runs)]
            locals_[pattern] = sorted(rs, key=lambda r: r["ops"] / r["seconds"])[len(rs) // 2]
        card1 = await card_side(image, seconds, runs, 1)
        card2 = await card_side(image, seconds, runs, 2)
        hio = await host_io(image, min(seconds, 0.5))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for pattern, bs, depth in PATTERNS:
        loc = _rates(locals_[pattern], bs)
        for nq, card in ((1, card1), (2, card2)):
            for zc in (True, False):
                if (pattern, zc) not in card:
                    continue
                c = _rates(card[(pattern, zc)], bs)
                rows.append(
                    {
                        "pattern": pattern,
                        "bs": bs,
                        "depth": depth,
                        "queues": nq,
                        "zero_copy": zc,
                        "card_mb_s": c["mb_s"],
                        "card_iops": c["iops"],
                        "local_mb_s": loc["mb_s"],
                        "local_iops": loc["iops"],
                        "ratio": round(c["mb_s"] / loc["mb_s"], 3),
                    }
                )
    seq = [float(str(r["ratio"])) for r in rows if r["pattern"] == "seqread" and r["zero_copy"]]
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "quick": quick,
        "python": sys.version.split()[0],
        "cpus": sorted(os.sched_getaffinity(0)),
        "image_mib": size // MiB,
        "seconds": seconds,
        "runs": runs,
        "rows": rows,
        "ratios": {
            "seqread_vs_local_best": max(seq),
            "seqread_vs_local_median": statistics.median(seq),
        },
        "target": {"seqread_vs_local": 0.7, "met": max(seq) >= 0.7},
        "host_io": hio,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.block", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short cells, one run each")
    args = p.parse_args(argv)
    res = asyncio.run(amain(args.quick))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    for r in res["rows"]:
        print(
            f"{r['pattern']:9} bs={r['bs']:>7} qd={r['depth']:>2} q={r['queues']} "
            f"zc={'y' if r['zero_copy'] else 'n'}  card {r['card_mb_s']:8.1f} MB/s "
            f"{r['card_iops']:>7} IOPS | local {r['local_mb_s']:8.1f} MB/s "
            f"{r['local_iops']:>7} IOPS | x{r['ratio']:.3f}"
        )
    print("host_io:", json.dumps(res["host_io"]))
    print("ratios:", res["ratios"], "target met:", res["target"]["met"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
