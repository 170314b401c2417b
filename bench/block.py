"""virtio-blk throughput: card-side I/O through the whole stack against local file I/O.

Measured in one run, on one image file:

- ``local``: the host process reading/writing the image directly
  (``os.preadv``/``os.pwritev`` into a preallocated buffer, one request at a
  time: page-cache I/O gains nothing from queue depth in one Python thread);
  ``ratio`` is against this. ``local_matched`` cycles through as many
  buffers as the card app has requests in flight (8 MiB for 1 MiB at QD8,
  where the card app uses 8 buffers and the one-buffer loop copies into a
  cache-hot one): ``ratio_matched``;
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
``python -m bench.block --ab TREE [--rounds N] [--queues Q]``: 1 MiB seqread QD8
and 4 KiB randread QD32 of this tree against ``TREE`` (a ``git worktree add``
of ``main``), alternating, each card run next to a local read of the same
minute; writes ``bench/results/block-ab.json``.

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


def local(path: Path, pattern: str, bs: int, seconds: float, buffers: int = 1) -> dict[str, Any]:
    """The host reading/writing the image itself, one request at a time. ``buffers``:
    how many buffers it cycles through (1: always the same, cache-hot one; the
    card app at depth D uses D buffers, one per request in flight)."""
    fd = os.open(path, os.O_RDWR)
    bufs = [bytearray(os.urandom(bs)) for _ in range(buffers)]
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
                buf = bufs[ops % buffers]
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
        matched: dict[str, dict[str, Any]] = {}
        for pattern, bs, depth in PATTERNS:
            rs = [local(image, pattern, bs, seconds) for _ in range(runs)]
            locals_[pattern] = sorted(rs, key=lambda r: r["ops"] / r["seconds"])[len(rs) // 2]
            rs = [local(image, pattern, bs, seconds, depth) for _ in range(runs)]
            matched[pattern] = sorted(rs, key=lambda r: r["ops"] / r["seconds"])[len(rs) // 2]
        card1 = await card_side(image, seconds, runs, 1)
        card2 = await card_side(image, seconds, runs, 2)
        hio = await host_io(image, min(seconds, 0.5))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for pattern, bs, depth in PATTERNS:
        loc = _rates(locals_[pattern], bs)
        loc_m = _rates(matched[pattern], bs)
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
                        "local_matched_mb_s": loc_m["mb_s"],
                        "ratio_matched": round(c["mb_s"] / loc_m["mb_s"], 3),
                    }
                )
    seq = [float(str(r["ratio"])) for r in rows if r["pattern"] == "seqread" and r["zero_copy"]]
    seq_m = [
        float(str(r["ratio_matched"])) for r in rows if r["pattern"] == "seqread" and r["zero_copy"]
    ]
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
            "seqread_vs_local_matched_best": max(seq_m),
            "seqread_vs_local_matched_median": statistics.median(seq_m),
        },
        "target": {"seqread_vs_local": 0.7, "met": max(seq) >= 0.7},
        "host_io": hio,
    }


#: One A/B cell, run with ``python -c SEQ_CELL ARGS_JSON`` in a tree: only what every
#: tree has (``mic_host.launch``, this module's ``card_io``/``make_image``); it writes its
#: own config, since older trees have no ``bench.config``.
SEQ_CELL = r"""
import asyncio, json, os, random, shutil, sys, tempfile, time
from pathlib import Path

import mic_host
from bench.block import MiB, make_image

args = json.loads(sys.argv[1])
CONFIG = (
    '[[cards]]\nname = "mic0"\nboot_at_start = true\ncard_ram = "128M"\n'
    'heartbeat_timeout = 30.0\n\n[[cards.devices]]\ntype = "block"\n'
    "options = {{ image = {image}, num_queues = {nq} }}\n"
)


def local(path, pattern, bs, seconds, buffers):
    fd = os.open(path, os.O_RDONLY)
    bufs = [bytearray(bs) for _ in range(buffers)]
    nblocks = os.fstat(fd).st_size // bs
    rng = random.Random(1)
    ops = pos = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(16):
            if pattern.startswith("seq"):
                b, pos = pos, (pos + 1) % nblocks
            else:
                b = rng.randrange(nblocks)
            os.preadv(fd, [bufs[ops % buffers]], b * bs)
            ops += 1
    os.close(fd)
    return ops * bs / (time.perf_counter() - t0) / 1e6


async def main():
    tmp = Path(tempfile.mkdtemp(prefix="micsq", dir="/tmp"))
    try:
        image = tmp / "bench.img"
        make_image(image, args["mib"] * MiB)
        cfg = CONFIG.format(image=json.dumps(str(image)), nq=args["queues"])
        async with mic_host.launch(str(tmp / "s"), cfg) as client:
            card = client.card("mic0")
            await card.wait("online", timeout=60)
            cells = {}
            for name, (pattern, bs, depth) in args["cells"].items():
                run = ("bench.block:card_io", "vda", pattern, bs, depth)
                await card.run(*run, 0.2, True)  # warm up: buffers, the app's import
                half = args["seconds"] / 2
                loc = local(image, pattern, bs, half, 1)  # the card's run between the halves
                loc_m = local(image, pattern, bs, half, depth)
                r = (await card.run(*run, args["seconds"], True))["value"]
                loc += local(image, pattern, bs, half, 1)
                loc_m += local(image, pattern, bs, half, depth)
                cells[name] = {
                    "card_mb_s": r["ops"] * bs / r["seconds"] / 1e6,
                    "local_mb_s": loc / 2,
                    "local_matched_mb_s": loc_m / 2,
                }
            return cells
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


print("RESULT " + json.dumps(asyncio.run(main())), flush=True)
"""
AB_CELLS = {"seqread-8": ("seqread", MiB, 8), "randread-32": ("randread", 4096, 32)}


def ab(b_tree: Path, rounds: int, seconds: float, queues: int) -> dict[str, Any]:
    """This tree (A) against ``b_tree`` (B), interleaved: each round runs both, in a
    fresh process in each tree (its daemon and card too), alternating which goes
    first. Every run measures the local read next to the card's, so each ratio
    is from one time window."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    trees = {"a": root, "b": b_tree.resolve()}
    if not (trees["b"] / "bench" / "block.py").is_file():
        raise SystemExit(f"--ab {b_tree}: not a MIC-VOP tree (no bench/block.py there)")
    commits = {
        v: subprocess.run(
            ["git", "-C", str(t), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or "?"
        for v, t in trees.items()
    }
    got: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    arg = json.dumps({"cells": AB_CELLS, "seconds": seconds, "queues": queues, "mib": 256})
    for rnd in range(rounds):
        for v in ("a", "b") if rnd % 2 == 0 else ("b", "a"):
            load = os.getloadavg()[0]
            r = subprocess.run(
                [sys.executable, "-c", SEQ_CELL, arg],
                cwd=trees[v], env=env, capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if not lines:
                raise RuntimeError(f"A/B cell in {trees[v]} failed:\n{r.stderr[-2000:]}")
            cells = json.loads(lines[0][7:])
            got[v].append({"load": round(load, 2), "cells": cells})
            print(
                f"round {rnd + 1} {v}: load {load:.1f}  "
                + "  ".join(
                    f"{n} card {c['card_mb_s']:8.1f} local {c['local_mb_s']:8.1f} MB/s "
                    f"x{c['card_mb_s'] / c['local_mb_s']:.3f} "
                    f"(x{c['card_mb_s'] / c['local_matched_mb_s']:.3f} matched)"
                    for n, c in cells.items()
                ),
                flush=True,
            )
    summary: dict[str, Any] = {}
    for name in AB_CELLS:

        def med(v: str, key: str, name: str = name) -> float:
            return statistics.median(
                float(run["cells"][name]["card_mb_s"] / run["cells"][name][key]) for run in got[v]
            )

        ratio = {v: med(v, "local_mb_s") for v in got}
        matched = {v: med(v, "local_matched_mb_s") for v in got}
        card = {
            v: statistics.median(run["cells"][name]["card_mb_s"] for run in got[v]) for v in got
        }
        summary[name] = {
            "a_ratio_to_local": round(ratio["a"], 3),
            "b_ratio_to_local": round(ratio["b"], 3),
            "a_ratio_to_local_matched": round(matched["a"], 3),
            "b_ratio_to_local_matched": round(matched["b"], 3),
            "a_card_mb_s": round(card["a"], 1),
            "b_card_mb_s": round(card["b"], 1),
            "card_a_over_b": round(card["a"] / card["b"], 3),
        }
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "b_tree": str(trees["b"]),
        "commits": commits,
        "queues": queues,
        "seconds": seconds,
        "load": [run["load"] for v in ("a", "b") for run in got[v]],
        "runs": got,
        "summary": summary,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.block", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short cells, one run each")
    p.add_argument(
        "--ab",
        type=Path,
        metavar="TREE",
        help="A/B: 1 MiB seqread QD8 and 4 KiB randread QD32, this tree against TREE "
        "(e.g. a `git worktree add` of main), interleaved; writes bench/results/block-ab.json",
    )
    p.add_argument("--rounds", type=int, default=3, help="--ab rounds (each runs both trees)")
    p.add_argument("--queues", type=int, default=1, help="--ab: the device's queues")
    args = p.parse_args(argv)
    if args.ab is not None:
        out = ab(args.ab, args.rounds, 0.5 if args.quick else 2.0, args.queues)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.with_name("block-ab.json").write_text(json.dumps(out, indent=1) + "\n")
        for name, row in out["summary"].items():
            print(f"{name}: {row}")
        return 0
    res = asyncio.run(amain(args.quick))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    for r in res["rows"]:
        print(
            f"{r['pattern']:9} bs={r['bs']:>7} qd={r['depth']:>2} q={r['queues']} "
            f"zc={'y' if r['zero_copy'] else 'n'}  card {r['card_mb_s']:8.1f} MB/s "
            f"{r['card_iops']:>7} IOPS | local {r['local_mb_s']:8.1f} MB/s "
            f"{r['local_iops']:>7} IOPS | x{r['ratio']:.3f} "
            f"(x{r['ratio_matched']:.3f} vs {r['depth']} local buffers)"
        )
    print("host_io:", json.dumps(res["host_io"]))
    print("ratios:", res["ratios"], "target met:", res["target"]["met"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
