"""Cost as work grows: CPU per block request with one card busy and with N busy at once.

One ``mic-host`` daemon serves ``--cards`` cards (default 4), each with its own
block device (its own 64 MiB image). Alternating, ``--runs`` times:

- ``one``: card ``mic0`` alone runs the block bench's card app
  (``bench.block:card_io``: 4 KiB random reads, queue depth 32, one queue,
  zero-copy) for ``--seconds``; the other cards are online and idle;
- ``all``: every card runs it at the same time.

CPU time (user + system, ``/proc/PID/stat``) of the daemon plus every card
process over the phase, divided by the requests completed in it: the cost of a
request. Goal (issue 16): with every card busy, at most 1.2x the cost with one
card; the aggregate IOPS are reported too. Both phases include the idle cards'
CPU, so the ratio is what the machine pays per request.

Run: ``python -m bench.scaling [--cards N] [--seconds S] [--runs R]
[--env KEY=VALUE]`` (``--env`` goes to the daemon and its cards, e.g.
``MIC_EVENT_LOOP=uvloop``); writes ``bench/results/scaling.json``;
``make bench`` runs it and ``bench/report.py`` renders it.
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

RESULTS = Path(__file__).with_name("results") / "scaling.json"
MiB = 1 << 20
GOAL = 1.2


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids`` so far."""
    ticks = 0
    for pid in pids:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(f[11]) + int(f[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def phase(cards: list[Any], pids: list[int], seconds: float) -> dict[str, float]:
    c0 = cpu_seconds(pids)
    t0 = time.perf_counter()
    res = await asyncio.gather(
        *(c.run("bench.block:card_io", "vda", "randread", 4096, 32, seconds, True) for c in cards)
    )
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pids) - c0
    ops = sum(int(r["value"]["ops"]) for r in res)
    iops = sum(r["value"]["ops"] / r["value"]["seconds"] for r in res)
    return {
        "ops": ops,
        "iops": round(iops),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_request": round(cpu / ops * 1e6, 2),
        "cpu_pct": round(cpu / wall * 100, 1),
    }


async def amain(n: int, seconds: float, runs: int, env: dict[str, str]) -> dict[str, Any]:
    import mic_host
    from bench.block import make_image

    tmp = Path(tempfile.mkdtemp(prefix="mics", dir="/tmp"))
    try:
        cfg = ""
        for i in range(n):
            image = tmp / f"card{i}.img"
            make_image(image, 64 * MiB)
            cfg += config.card(config.block(image), name=f"mic{i}", card_ram="64M")
        async with mic_host.launch(tmp / "state", cfg, env=env) as client:
            cards = [client.card(f"mic{i}") for i in range(n)]
            for c in cards:
                await c.wait("online", timeout=60)
            pids = [int((await client.ping())["pid"])]
            pids += [int((await c.status())["pid"]) for c in cards]
            await phase(cards, pids, 0.3)  # warm up every card (app import, buffers)
            one: list[dict[str, float]] = []
            every: list[dict[str, float]] = []
            for _ in range(runs):
                one.append(await phase(cards[:1], pids, seconds))
                every.append(await phase(cards, pids, seconds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def med(rs: list[dict[str, float]], key: str) -> float:
        return float(statistics.median(r[key] for r in rs))

    ratio = med(every, "cpu_us_per_request") / med(one, "cpu_us_per_request")
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": sys.version.split()[0],
        "load": [round(x, 2) for x in os.getloadavg()],
        "cards": n,
        "seconds": seconds,
        "runs": runs,
        "env": env,
        "workload": "4 KiB random read, QD32, 1 queue, zero-copy, per card",
        "one": one,
        "all": every,
        "one_cpu_us": med(one, "cpu_us_per_request"),
        "all_cpu_us": med(every, "cpu_us_per_request"),
        "one_iops": med(one, "iops"),
        "all_iops": med(every, "iops"),
        "cpu_ratio": round(ratio, 3),
        "goal": GOAL,
        "met": ratio <= GOAL,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    p.add_argument("--cards", type=int, default=4)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--label", default="", help="what was measured (the report's heading)")
    args = p.parse_args(argv)
    env = dict(e.split("=", 1) for e in args.env)
    res = asyncio.run(amain(args.cards, args.seconds, args.runs, env))
    if args.label:
        res["label"] = args.label
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    print(
        f"1 card: {res['one_iops']:,.0f} IOPS, {res['one_cpu_us']} µs CPU/request; "
        f"{res['cards']} cards: {res['all_iops']:,.0f} IOPS aggregate, "
        f"{res['all_cpu_us']} µs CPU/request -> {res['cpu_ratio']}x (goal <= {GOAL}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
