"""The packed ring against the split ring through the whole VOP stack, A/B in one run.

One daemon, one card, two disks on copies of one image: ``vda`` on the split
ring (the default), ``vdb`` configured ``ring = "packed"``. The card app
:func:`bench.block.card_io` drives each in turn, cell by cell and round by
round (split, packed, split, packed, ...), so both see the same machine load;
the result is the median of the rounds and the packed/split ratio per cell.

Cells: 4 KiB random reads at queue depth 1 and 32, 1 MiB sequential reads at
depth 8, 4 KiB random writes at depth 32 (zero-copy buffers).

Run: ``python -m bench.vop_ring [--quick] [--rounds N] [--json PATH]``;
writes ``bench/results/vop_ring.json`` by default.
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

from bench import config
from bench.block import MiB, make_image

RESULTS = Path(__file__).with_name("results") / "vop_ring.json"
CELLS = (
    ("randread", 4096, 1),
    ("randread", 4096, 32),
    ("seqread", MiB, 8),
    ("randwrite", 4096, 32),
)


async def one_layout(
    first: str, images: list[Path], seconds: float, rounds: int
) -> dict[tuple[str, int, int], dict[str, list[float]]]:
    """One daemon whose ``vda`` runs ring ``first`` and ``vdb`` the other one;
    IOPS per cell and ring, rounds alternating which disk goes first."""
    import mic_host

    second = "packed" if first == "split" else "split"
    cfg = config.card(
        *(
            config.block(img, name=ring, ring=ring)
            for ring, img in zip((first, second), images, strict=True)
        )
    )
    sd = tempfile.mkdtemp(prefix="micr", dir="/tmp")
    out: dict[tuple[str, int, int], dict[str, list[float]]] = {}
    try:
        async with mic_host.launch(sd, cfg) as client:
            card = client.card("mic0")
            await card.wait("online", timeout=60)
            rings = {d["device"]: d["ring"] for d in (await card.stats())["devices"]}
            assert rings == {"vda": first, "vdb": second}, rings
            for pattern, bs, depth in CELLS:
                iops: dict[str, list[float]] = {"split": [], "packed": []}
                order = [(first, "vda"), (second, "vdb")]
                for _ in range(rounds):
                    order.reverse()  # each disk goes first in every other round
                    for ring, dev in order:
                        r = await card.run(
                            "bench.block:card_io", dev, pattern, bs, depth, seconds, True
                        )
                        v = r["value"]
                        iops[ring].append(v["ops"] / v["seconds"])
                out[(pattern, bs, depth)] = iops
    finally:
        shutil.rmtree(sd, ignore_errors=True)
    return out


async def amain(seconds: float, rounds: int, size: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="micr", dir="/tmp"))
    images = [tmp / "disk0.img", tmp / "disk1.img"]
    make_image(images[0], size)
    shutil.copyfile(images[0], images[1])
    with images[1].open("rb+") as f:
        os.fsync(f.fileno())  # both clean in the page cache
    images[1].read_bytes()
    try:
        # The disk's place on the card matters by itself (measured A/A: the
        # second of two split disks wrote 1.4x faster), so each ring runs in
        # both places, one daemon each, and the medians pool both.
        a = await one_layout("split", images, seconds, rounds)
        b = await one_layout("packed", images, seconds, rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for pattern, bs, depth in CELLS:
        key = (pattern, bs, depth)
        pooled = {ring: a[key][ring] + b[key][ring] for ring in ("split", "packed")}
        split, packed = (statistics.median(pooled[k]) for k in ("split", "packed"))
        rows.append(
            {
                "pattern": pattern,
                "bs": bs,
                "depth": depth,
                "split_iops": round(split),
                "packed_iops": round(packed),
                "split_mb_s": round(split * bs / 1e6, 1),
                "packed_mb_s": round(packed * bs / 1e6, 1),
                "ratio_packed_vs_split": round(packed / split, 3),
                "rounds": {
                    f"{ring} as {dev}": [round(x) for x in lay[key][ring]]
                    for lay, first in ((a, "split"), (b, "packed"))
                    for ring, dev in (
                        (first, "vda"),
                        ("packed" if first == "split" else "split", "vdb"),
                    )
                },
            }
        )
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": sys.version.split()[0],
        "cpus": sorted(os.sched_getaffinity(0)),
        "loadavg": list(os.getloadavg()),
        "seconds": seconds,
        "rounds": rounds,
        "image_mib": size // MiB,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vop_ring", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short cells, small image")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds per cell (default 3)")
    p.add_argument("--json", type=Path, default=RESULTS, help="where to write the result")
    args = p.parse_args(argv)
    seconds = 0.3 if args.quick else 2.0
    size = 16 * MiB if args.quick else 128 * MiB
    res = asyncio.run(amain(seconds, max(1, args.rounds), size))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    for r in res["rows"]:
        print(
            f"{r['pattern']:9} bs={r['bs']:>7} qd={r['depth']:>2}  split {r['split_iops']:>6} IOPS"
            f"  packed {r['packed_iops']:>6} IOPS  packed/split x{r['ratio_packed_vs_split']:.3f}"
        )
    print("load average:", " ".join(f"{x:.2f}" for x in res["loadavg"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
