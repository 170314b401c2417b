"""Where the time goes: CPU per request of the daemon and the card, by function (issue 16).

Runs one workload through real processes while ``py-spy`` samples the daemon
(``mic-host``) and the card OS (``mic-card``), and reads each process's CPU
time from ``/proc/PID/stat`` over the same window:

- ``block-read`` / ``block-write``: the block bench's card app
  (``bench.block:card_io``), 4 KiB random at queue depth 32 into DMA buffers
  (zero-copy), one queue; a request is one 4 KiB read or write;
- ``block-seqread``: the same app, 1 MiB sequential reads at queue depth 8
  (the 1 MiB seqread cell of ``bench/block.py``); a request is one 1 MiB read;
- ``net``: iperf3 TCP host -> card through the card's NIC (``tap`` backend,
  as ``bench/net.py``); a "request" is one packet the host backend moved.
  Needs root, iproute2 and iperf3.

Per process: CPU µs per request (user + system), and the top functions by
*self* time (the leaf frame of each non-idle sample, py-spy's default) as
µs per request: the sample fraction times the process's CPU per request.
``--svg DIR`` also writes py-spy flame graphs there.

Run: ``python -m bench.profile [--workload block-read,block-write,block-seqread,net]
[--seconds S] [--rate HZ]``; writes ``bench/results/profile.json``
(``--json``); ``bench/report.py`` renders it into ``docs/performance.md``.
Needs ``py-spy`` on the PATH and the right to ptrace (root).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import config

RESULTS = Path(__file__).with_name("results") / "profile.json"
MiB = 1 << 20
TOP = 14


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` so far (``/proc/PID/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _frame(f: str) -> str:
    """``name (path/file.py:line)`` -> ``name (file.py)``: self time by function."""
    name, _, where = f.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({path.rsplit('/', 2)[-2] + '/' if '/' in path else ''}{Path(path).name})"


def collapse(raw: Path) -> dict[str, Any]:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed) output."""
    self_: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        k = int(n)
        frames = [_frame(f) for f in stack.split(";")[1:]]  # [0] is the thread
        if not frames:
            continue
        total += k
        self_[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    return {"samples": total, "self": self_, "inclusive": incl}


async def spy(pid: int, seconds: float, rate: int, out: Path, fmt: str) -> asyncio.Task[Any]:
    proc = await asyncio.create_subprocess_exec(
        "py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", str(rate), "--format", fmt, "--output", str(out), "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip

    async def done() -> None:
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"py-spy on pid {pid} failed: {err.decode()[-400:]}")

    return asyncio.ensure_future(done())


async def measure(
    pids: dict[str, int],
    seconds: float,
    rate: int,
    svg_dir: Path | None,
    tag: str,
    work: Any,
) -> dict[str, Any]:
    """Run ``work()`` (returns the number of requests) while sampling ``pids``."""
    tmp = Path(tempfile.mkdtemp(prefix="micprof", dir="/tmp"))
    try:
        spies = [
            await spy(pid, seconds, rate, tmp / f"{who}.txt", "raw") for who, pid in pids.items()
        ]
        if svg_dir is not None:
            os.makedirs(svg_dir, exist_ok=True)
            spies += [
                await spy(pid, seconds, rate, svg_dir / f"profile-{tag}-{who}.svg", "flamegraph")
                for who, pid in pids.items()
            ]
        await asyncio.sleep(0.3)  # py-spy attaches
        cpu0 = {who: cpu_seconds(pid) for who, pid in pids.items()}
        t0 = time.perf_counter()
        requests = await work()
        wall = time.perf_counter() - t0
        cpu = {who: cpu_seconds(pid) - cpu0[who] for who, pid in pids.items()}
        for s in spies:
            await s
        procs: dict[str, Any] = {}
        for who in pids:
            c = collapse(tmp / f"{who}.txt")
            us = cpu[who] / requests * 1e6
            n = c["samples"] or 1
            procs[who] = {
                "cpu_s": round(cpu[who], 3),
                "cpu_pct": round(cpu[who] / wall * 100, 1),
                "us_per_request": round(us, 2),
                "samples": c["samples"],
                "top_self": [
                    {"function": f, "share": round(k / n, 4), "us": round(us * k / n, 2)}
                    for f, k in c["self"].most_common(TOP)
                ],
                "top_inclusive": [
                    {"function": f, "share": round(k / n, 4), "us": round(us * k / n, 2)}
                    for f, k in c["inclusive"].most_common(TOP * 2)
                ],
            }
        return {
            "requests": requests,
            "wall_s": round(wall, 3),
            "rate": round(requests / wall),
            "us_per_request": round(sum(p["us_per_request"] for p in procs.values()), 2),
            "processes": procs,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def block(
    pattern: str, seconds: float, rate: int, svg: Path | None, bs: int = 4096, depth: int = 32
) -> dict[str, Any]:
    import mic_host
    from bench.block import make_image

    tmp = Path(tempfile.mkdtemp(prefix="micp", dir="/tmp"))
    try:
        image = tmp / "bench.img"
        make_image(image, (256 if bs >= MiB else 64) * MiB)
        async with mic_host.launch(tmp / "state", config.card(config.block(image))) as client:
            card = client.card("mic0")
            await card.wait("online", timeout=60)
            pids = {"daemon": int((await client.ping())["pid"])}
            pids["card"] = int((await card.status())["pid"])
            # warm up (first touches of the buffers, the app's import)
            await card.run("bench.block:card_io", "vda", pattern, bs, depth, 0.3, True)

            async def work() -> int:
                r = await card.run("bench.block:card_io", "vda", pattern, bs, depth, seconds, True)
                return int(r["value"]["ops"])

            res = await measure(pids, seconds, rate, svg, pattern, work)
            size = "1 MiB" if bs == MiB else f"{bs // 1024} KiB"
            res["workload"] = f"block {size} {pattern} QD{depth}, 1 queue, zero-copy"
            return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def net(seconds: float, rate: int, svg: Path | None) -> dict[str, Any]:
    from bench.net import card_net, iperf, namespaces

    hns, cns = f"mvph-{uuid.uuid4().hex[:5]}", f"mvpc-{uuid.uuid4().hex[:5]}"
    state = Path(tempfile.mkdtemp(prefix="micp", dir="/tmp"))
    try:
        with namespaces(hns):
            async with card_net(state, hns, cns) as card:
                client = card.client
                pids = {"daemon": int((await client.ping())["pid"])}
                pids["card"] = int((await card.status())["pid"])
                gbps: list[float] = []

                async def packets() -> int:
                    d = (await card.net())["devices"][0]
                    c = d.get("counters") or {}
                    return int(c.get("tx_packets", 0)) + int(c.get("rx_packets", 0))

                async def work() -> int:
                    p0 = await packets()
                    gbps.append(await iperf(cns, hns, "172.31.1.1", seconds))
                    return await packets() - p0

                res = await measure(pids, seconds + 0.5, rate, svg, "net", work)
                res["gbps"] = round(gbps[0], 2)
                res["workload"] = "net iperf3 TCP host -> card (tap backend); request = one packet"
                return res
    finally:
        shutil.rmtree(state, ignore_errors=True)


def problem() -> str | None:
    if shutil.which("py-spy") is None:
        return "py-spy is not installed"
    probe = subprocess.run(
        ["py-spy", "dump", "--pid", str(os.getpid())], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return f"py-spy cannot attach: {probe.stderr.decode()[-200:].strip()}"
    return None


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": sys.version.split()[0],
        "load": os.getloadavg()[0],
        "seconds": args.seconds,
        "rate": args.rate,
        "label": args.label,
        "runs": {},
    }
    for w in args.workload.split(","):
        if w in ("block-read", "block-write"):
            pattern = "randread" if w == "block-read" else "randwrite"
            out["runs"][w] = await block(pattern, args.seconds, args.rate, args.svg)
        elif w == "block-seqread":
            out["runs"][w] = await block("seqread", args.seconds, args.rate, args.svg, MiB, 8)
        elif w == "net":
            from bench.latency import net_problem

            why = net_problem() or (None if shutil.which("iperf3") else "needs iperf3")
            out["runs"][w] = (
                {"skipped": why} if why else await net(args.seconds, args.rate, args.svg)
            )
        else:
            raise SystemExit(
                f"unknown workload {w!r} (block-read, block-write, block-seqread, net)"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--workload", default="block-read,block-write,net")
    p.add_argument("--seconds", type=float, default=5.0, help="sampled seconds per workload")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--svg", type=Path, default=None, help="also write flame graphs here")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--label", default="", help="what was measured (the report's heading)")
    args = p.parse_args(argv)
    why = problem()
    if why is not None:
        print(f"bench.profile skipped: {why}")
        return 0
    res = asyncio.run(amain(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    for w, r in res["runs"].items():
        if "skipped" in r:
            print(f"{w}: skipped ({r['skipped']})")
            continue
        print(f"{w}: {r['rate']:,} req/s, {r['us_per_request']} µs CPU per request")
        for who, pr in r["processes"].items():
            print(f"  {who}: {pr['us_per_request']} µs/req ({pr['cpu_pct']}% CPU)")
            for row in pr["top_self"][:8]:
                print(f"    {row['us']:7.2f} µs  {row['share'] * 100:5.1f}%  {row['function']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
