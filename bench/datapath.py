"""The block data path, ``cpu`` against ``dma`` against ``auto``, in one run.

One daemon, one card, three read-only disks on the same (page-cached) image,
identical but for ``data_path``: ``vda`` cpu, ``vdb`` dma, ``vdc`` auto (its
default threshold, :data:`mic_host.backends.datapath.AUTO_DMA_THRESHOLD`).
A card app (``bench.block:card_io``, zero-copy buffers) drives each cell on
each disk in turn, the order rotating every round, so all three see the same
load; ratios are medians of the rounds.

Cells: 4 KiB random read QD32 (IOPS), 1 MiB sequential read QD8 (MB/s), 4 KiB
random read QD1 (µs per request), and a size sweep (4K..1M random reads, QD8,
cpu vs dma) from which the ``auto`` threshold is chosen: the smallest size
from which DMA is at least as fast as CPU at every larger size, or None.

Run: ``python -m bench.datapath [--quick] [--rounds N]``; writes
``bench/results/datapath.json``; ``bench.report`` puts its rows in the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.block import make_image

RESULTS = Path(__file__).with_name("results") / "datapath.json"
KiB, MiB = 1 << 10, 1 << 20
MODES = ("cpu", "dma", "auto")
#: (name, pattern, block size, queue depth, unit)
CELLS = (
    ("4K randread QD32", "randread", 4 * KiB, 32, "iops"),
    ("1M seqread QD8", "seqread", MiB, 8, "mb_s"),
    ("4K randread QD1", "randread", 4 * KiB, 1, "lat_us"),
)
SWEEP = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB)

CONFIG = """
[[cards]]
name = "mic0"
boot_at_start = true
card_ram = "128M"
heartbeat_timeout = 30.0
"""
DEVICE = """
[[cards.devices]]
type = "block"
name = "{mode}"
options = {{ image = "{image}", read_only = true, data_path = "{mode}" }}
"""


def _value(r: dict[str, Any], bs: int, unit: str) -> float:
    rate = r["ops"] / r["seconds"]
    if unit == "iops":
        return rate
    if unit == "mb_s":
        return rate * bs / 1e6
    return 1e6 / rate  # lat_us at QD1: the time per request


def _better(unit: str, a: float, b: float) -> float:
    """How much better ``a`` is than ``b`` (> 1: better), whatever the unit."""
    return b / a if unit == "lat_us" else a / b


async def measure(image: Path, seconds: float, rounds: int) -> dict[str, Any]:
    import mic_host
    from mic_host.backends.datapath import AUTO_DMA_THRESHOLD

    cfg = CONFIG + "".join(DEVICE.format(mode=m, image=image) for m in MODES)
    sd = tempfile.mkdtemp(prefix="micd", dir="/tmp")
    cells: dict[str, dict[str, list[float]]] = {}
    sweep: dict[int, dict[str, list[float]]] = {}
    loads: list[float] = []
    try:
        async with mic_host.launch(sd, cfg) as client:
            card = client.card("mic0")
            await card.wait("online", timeout=60)
            devs = {d["name"]: d["device"] for d in (await card.stats())["devices"]}

            async def run(mode: str, pattern: str, bs: int, depth: int) -> dict[str, Any]:
                r = await card.run(
                    "bench.block:card_io", devs[mode], pattern, bs, depth, seconds, True
                )
                return dict(r["value"])

            for rnd in range(rounds):
                loads.append(os.getloadavg()[0])
                order = MODES[rnd % 3 :] + MODES[: rnd % 3]
                for name, pattern, bs, depth, unit in CELLS:
                    for mode in order:
                        v = _value(await run(mode, pattern, bs, depth), bs, unit)
                        cells.setdefault(name, {}).setdefault(mode, []).append(v)
                for bs in SWEEP:
                    for mode in order:
                        if mode == "auto":
                            continue
                        v = _value(await run(mode, "randread", bs, 8), bs, "mb_s")
                        sweep.setdefault(bs, {}).setdefault(mode, []).append(v)
            stats = {d["name"]: d["backend"] for d in (await card.stats())["devices"]}
    finally:
        shutil.rmtree(sd, ignore_errors=True)
    rows = []
    for name, _pattern, bs, depth, unit in CELLS:
        med = {m: statistics.median(cells[name][m]) for m in MODES}
        best = max(MODES[:2], key=lambda m: _better(unit, med[m], med["cpu"]))
        rows.append(
            {
                "cell": name,
                "bs": bs,
                "depth": depth,
                "unit": unit,
                "median": {m: round(v, 1) for m, v in med.items()},
                "runs": {m: [round(v, 1) for v in cells[name][m]] for m in MODES},
                "dma_vs_cpu": round(_better(unit, med["dma"], med["cpu"]), 3),
                "auto_vs_cpu": round(_better(unit, med["auto"], med["cpu"]), 3),
                "auto_vs_best": round(_better(unit, med["auto"], med[best]), 3),
            }
        )
    sweep_rows = [
        {
            "bs": bs,
            "cpu_mb_s": round(statistics.median(sweep[bs]["cpu"]), 1),
            "dma_mb_s": round(statistics.median(sweep[bs]["dma"]), 1),
            "dma_vs_cpu": round(
                statistics.median(sweep[bs]["dma"]) / statistics.median(sweep[bs]["cpu"]), 3
            ),
        }
        for bs in SWEEP
    ]
    threshold = None
    for row in reversed(sweep_rows):
        if row["dma_vs_cpu"] < 1.0:
            break
        threshold = row["bs"]
    return {
        "rows": rows,
        "sweep": sweep_rows,
        "measured_threshold": threshold,
        "auto_default_threshold": AUTO_DMA_THRESHOLD,
        "counters": stats,
        "loadavg": [round(x, 2) for x in loads],
    }


async def amain(quick: bool, rounds: int | None) -> dict[str, Any]:
    seconds = 0.5 if quick else 1.5
    rounds = rounds or (1 if quick else 3)
    size = 64 * MiB if quick else 256 * MiB
    tmp = Path(tempfile.mkdtemp(prefix="micd", dir="/tmp"))
    image = tmp / "bench.img"
    make_image(image, size)
    try:
        res = await measure(image, seconds, rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "quick": quick,
        "python": sys.version.split()[0],
        "image_mib": size // MiB,
        "seconds": seconds,
        "rounds": rounds,
        **res,
    }


# -- bench.report: the performance.md section and the summary rows -------------------------


def _fmt(unit: str, v: float) -> str:
    return {"iops": f"{v:,.0f} IOPS", "mb_s": f"{v:,.0f} MB/s", "lat_us": f"{v:,.0f} µs"}[unit]


def section(r: dict[str, Any]) -> list[str]:
    """The ``docs/performance.md`` section of ``bench/results/datapath.json``."""
    out = [
        "## Block data path: CPU copy vs DMA engine (`bench/datapath.py`)",
        "",
        f"Measured {r['when']}, {r['rounds']} interleaved rounds of {r['seconds']:g} s, load "
        f"average {', '.join(str(x) for x in r['loadavg'])}. Three read-only disks on one "
        "image, identical but for `data_path`; ratios > 1 mean better than `cpu`. "
        "Why `auto` is what it is: `docs/block.md`.",
        "",
        "| cell | cpu | dma | auto | dma vs cpu | auto vs cpu |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        m, u = row["median"], row["unit"]
        out.append(
            f"| {row['cell']} | {_fmt(u, m['cpu'])} | {_fmt(u, m['dma'])} | {_fmt(u, m['auto'])} "
            f"| {row['dma_vs_cpu']:.2f}x | {row['auto_vs_cpu']:.2f}x |"
        )
    out += ["", "| random read QD8 | cpu MB/s | dma MB/s | dma vs cpu |", "|---|---|---|---|"]
    out += [
        f"| {s['bs'] // KiB} KiB | {s['cpu_mb_s']:,.0f} | {s['dma_mb_s']:,.0f} "
        f"| {s['dma_vs_cpu']:.2f}x |"
        for s in r["sweep"]
    ]
    t = r["measured_threshold"]
    out += [
        "",
        f"Threshold from this run: {'none (DMA never won)' if t is None else f'{t} B'}; "
        f"`auto`'s default: {r['auto_default_threshold']}.",
        "",
    ]
    return out


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Summary rows: ``auto`` is within noise (0.9x) of the faster path in every cell."""
    return [
        {
            "bench": "datapath",
            "target": f"block {row['cell']}: auto vs the faster of cpu/dma",
            "measured": f"{row['auto_vs_best']:.2f}x (dma {row['dma_vs_cpu']:.2f}x cpu)",
            "goal": ">= 0.9x",
            "met": row["auto_vs_best"] >= 0.9,
        }
        for row in r["rows"]
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.datapath", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short cells, one round")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    args = p.parse_args(argv)
    res = asyncio.run(amain(args.quick, args.rounds))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(section(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
