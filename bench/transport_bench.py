"""Transport benchmark: doorbell round trips and DMA copy bandwidth.

``python -m bench.transport_bench [--quick]``. Writes bench/results/transport.json and
prints a markdown table (copied into docs/transport.md, "Performance").

- Doorbell RTT: the host rings h2c doorbell 0, the card process (a real
  ``PcieCard``) waits on its vector 0 and rings c2h doorbell 0 back; the host
  waits on its vector 0. Eventfd, polling and hybrid modes (and a hybrid spin
  budget sweep), with the two processes pinned to different CPUs ("split") and
  to the same CPU ("same"). ``multiprocessing.Pipe`` ping-pong in the same run
  and placements is the baseline.
- DMA: ``await dma.copy()`` (host side, host-RAM window -> card RAM) against a
  plain ``dst[:] = src`` memoryview copy between the same mapped regions, for
  4 KiB .. 16 MiB, and the event-loop stall while copying 16 MiB inline,
  chunked, or in a thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from transport import (
    SMPT_BASE,
    DmaEngine,
    DmaPolicy,
    HostAddressSpace,
    Mmio,
    MmioLayout,
    NotifyMode,
    NotifyPolicy,
    PcieCard,
    PcieConfig,
    PcieHost,
    Region,
    SmptTable,
)
from virtio.errors import WouldBlock

RESULTS = Path(__file__).parent / "results" / "transport.json"
REPO = Path(__file__).resolve().parents[1]
KiB, MiB = 1 << 10, 1 << 20


# --------------------------------------------------------------------- card side
async def card_main(path: str) -> None:
    async with PcieCard.connect(path) as card:
        link = card.link
        while True:
            msg = await link.recv()
            op = msg["op"]
            if op == "pin":
                os.sched_setaffinity(0, {msg["cpu"]})
                await link.send({"ok": True})
            elif op == "pingpong":
                vec, db = card.mmio.vector(0), card.mmio.doorbell(0)
                vec.policy = NotifyPolicy(mode=NotifyMode[msg["mode"]], spin_ns=msg["spin_ns"])
                sleeps0, n = vec.sleeps, 0
                while True:
                    await vec.wait()
                    db.ring()
                    n += 1
                    with contextlib.suppress(WouldBlock):
                        link.recv_nowait()  # "stop"
                        break
                await link.send({"rounds": n, "sleeps": vec.sleeps - sleeps0})
            elif op == "exit":
                await link.send({"ok": True})
                return


# --------------------------------------------------------------------- doorbells
def _summary(ns: list[int]) -> dict[str, float]:
    ns = sorted(ns)
    return {
        "n": len(ns),
        "mean_us": statistics.fmean(ns) / 1e3,
        "p50_us": ns[len(ns) // 2] / 1e3,
        "p99_us": ns[min(len(ns) - 1, int(len(ns) * 0.99))] / 1e3,
    }


async def _pingpong(
    host: PcieHost, mode: NotifyMode, spin_ns: int, rounds: int, budget_s: float
) -> dict[str, Any]:
    link = host.link
    vec, db = host.mmio.vector(0), host.mmio.doorbell(0)
    vec.policy = NotifyPolicy(mode=mode, spin_ns=spin_ns)
    sleeps0 = vec.sleeps
    await link.send({"op": "pingpong", "mode": mode.name, "spin_ns": spin_ns})
    times: list[int] = []
    pc = time.perf_counter_ns
    end = pc() + int(budget_s * 1e9)
    for _ in range(rounds):
        t0 = pc()
        db.ring()
        await vec.wait()
        t1 = pc()
        times.append(t1 - t0)
        if t1 > end:
            break
    await link.send({"op": "stop"})
    reply_task = asyncio.ensure_future(link.recv())
    while not reply_task.done():  # the card may be spinning without reading the link
        db.ring()
        await asyncio.wait([reply_task], timeout=0.01)
    reply = reply_task.result()
    await asyncio.sleep(0.02)
    with contextlib.suppress(WouldBlock):
        vec.wait_nowait()
    out = _summary(times[len(times) // 20 :])  # drop the warm-up 5%
    out["host_sleeps"] = vec.sleeps - sleeps0
    out["card_sleeps"] = reply["sleeps"]
    return out


def _pipe_child(conn: Any, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    while True:
        b = conn.recv_bytes()
        if b == b"x":
            return
        conn.send_bytes(b)


def pipe_rtt(cpus: tuple[int, int], rounds: int, budget_s: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_pipe_child, args=(b, cpus[1]))
    p.start()
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})
    try:
        msg = b"\0" * 8
        a.send_bytes(msg)
        a.recv_bytes()
        times = []
        pc = time.perf_counter_ns
        end = pc() + int(budget_s * 1e9)
        for _ in range(rounds):
            t0 = pc()
            a.send_bytes(msg)
            a.recv_bytes()
            t1 = pc()
            times.append(t1 - t0)
            if t1 > end:
                break
        a.send_bytes(b"x")
        p.join()
    finally:
        os.sched_setaffinity(0, old)
        a.close()
        b.close()
    return _summary(times[len(times) // 20 :])


async def doorbell_bench(quick: bool) -> dict[str, Any]:
    rounds = 3000 if quick else 20000
    budget = 0.5 if quick else 2.0
    ncpu = len(os.sched_getaffinity(0))
    placements = {"split": (0, 1), "same": (0, 0)} if ncpu >= 2 else {"same": (0, 0)}
    results: dict[str, Any] = {"placements": {}}
    old = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="micbench-") as d:
        path = os.path.join(d, "mic0.sock")
        cfg = PcieConfig(card_ram_size=MiB, host_ram_size=MiB)
        async with PcieHost(path, config=cfg) as host:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.transport_bench", "--card", path,
                cwd=REPO,
            )  # fmt: skip
            try:
                link = await host.accept()
                for name, (hc, cc) in placements.items():
                    os.sched_setaffinity(0, {hc})
                    await link.send({"op": "pin", "cpu": cc})
                    await link.recv()
                    rows: dict[str, Any] = {}
                    cases = [
                        ("eventfd", NotifyMode.EVENTFD, 0),
                        ("poll", NotifyMode.POLL, 0),
                        ("hybrid 50us", NotifyMode.HYBRID, 50_000),
                    ]
                    if name == "split":
                        cases += [
                            ("hybrid 0", NotifyMode.HYBRID, 0),
                            ("hybrid 5us", NotifyMode.HYBRID, 5_000),
                            ("hybrid 20us", NotifyMode.HYBRID, 20_000),
                            ("hybrid 200us", NotifyMode.HYBRID, 200_000),
                        ]
                    for label, mode, spin in cases:
                        rows[label] = await _pingpong(host, mode, spin, rounds, budget)
                        print(f"  doorbell {name:5} {label:12} {rows[label]}", file=sys.stderr)
                    os.sched_setaffinity(0, old)
                    rows["multiprocessing.Pipe"] = await asyncio.to_thread(
                        pipe_rtt, (hc, cc), rounds, budget
                    )
                    results["placements"][name] = rows
                await link.send({"op": "exit"})
                await link.recv()
            finally:
                os.sched_setaffinity(0, old)
                await proc.wait()
    return results


# --------------------------------------------------------------------- DMA
def _rate(fn: Any, size: int, min_s: float) -> float:
    """GB/s (1e9 B/s) of a synchronous copy function, median of 5 calibrated loops."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_s / 5:
            break
        n *= 2
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rates.append(size * n / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


async def _arate(fn: Any, size: int, min_s: float) -> float:
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        dt = time.perf_counter() - t0
        if dt >= min_s / 5:
            break
        n *= 2
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        rates.append(size * n / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


async def _stall(dma: DmaEngine, size: int, seconds: float) -> dict[str, float]:
    """Max/mean lateness of a 1 ms ticker while copies of ``size`` run back to back."""
    late: list[float] = []
    stop = False

    async def ticker() -> None:
        while not stop:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append(time.perf_counter() - t0 - 0.001)

    async def copier() -> int:
        n = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            await dma.copy(0, SMPT_BASE, size)
            n += 1
            await asyncio.sleep(0)  # an inline copy completes without yielding
        return n

    t = asyncio.ensure_future(ticker())
    t0 = time.perf_counter()
    n = await copier()
    dt = time.perf_counter() - t0
    stop = True
    await t
    return {
        "gbps": n * size / dt / 1e9,
        "tick_max_ms": max(late) * 1e3,
        "tick_mean_ms": statistics.fmean(late) * 1e3,
    }


async def dma_bench(quick: bool) -> dict[str, Any]:
    min_s = 0.1 if quick else 0.5
    sizes = [4 * KiB, 64 * KiB, MiB, 16 * MiB]
    card = Region.create("card_ram", 32 * MiB)
    hram = Region.create("host_ram", 32 * MiB)
    mmio = Mmio.create(MmioLayout())
    smpt = SmptTable(mmio.words, hram.size)
    smpt.open(0, hram.size)
    space = HostAddressSpace(card, hram, smpt)
    out: dict[str, Any] = {"sizes": {}, "stall_16MiB": {}}
    try:
        hv, cv = hram.view(), card.view()
        hv[:] = os.urandom(len(hv))
        cv[:] = bytes(len(cv))  # pre-fault
        for size in sizes:
            src, dst = hv[:size], cv[:size]

            def plain(dst: memoryview = dst, src: memoryview = src) -> None:
                dst[:] = src

            row: dict[str, float] = {"memoryview": _rate(plain, size, min_s)}
            async with DmaEngine(space) as dma:
                row["dma"] = await _arate(
                    lambda dma=dma, n=size: dma.copy(0, SMPT_BASE, n), size, min_s
                )
                row["dma_unaligned_cpu"] = await _arate(
                    lambda dma=dma, n=size: dma.copy(1, SMPT_BASE, n - 64), size - 64, min_s
                )
            if size >= MiB:
                async with DmaEngine(space, DmaPolicy(thread_threshold=MiB)) as dma:
                    row["dma_thread"] = await _arate(
                        lambda dma=dma, n=size: dma.copy(0, SMPT_BASE, n), size, min_s
                    )
            out["sizes"][size] = row
            print(f"  dma {size:>9} {row}", file=sys.stderr)
        secs = 0.3 if quick else 1.0
        for label, pol in (
            ("inline, one 16 MiB copy", DmaPolicy(chunk=16 * MiB, inline_max=16 * MiB)),
            ("worker, 1 MiB chunks (default)", DmaPolicy()),
            ("worker, 256 KiB chunks", DmaPolicy(chunk=256 * KiB)),
            ("thread (1 MiB chunks)", DmaPolicy(thread_threshold=MiB)),
        ):
            async with DmaEngine(space, pol) as dma:
                out["stall_16MiB"][label] = await _stall(dma, 16 * MiB, secs)
            print(f"  stall {label} {out['stall_16MiB'][label]}", file=sys.stderr)
        hv.release()
        cv.release()
    finally:
        space.release()
        mmio.close()
        card.close()
        hram.close()
    return out


# --------------------------------------------------------------------- report
def markdown(res: dict[str, Any]) -> str:
    lines = []
    db = res["doorbell"]["placements"]
    lines.append("Doorbell round trip (host rings, card wakes and rings back), µs:\n")
    lines.append("| placement | variant | mean | p50 | p99 | host sleeps | card sleeps | rounds |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for place, rows in db.items():
        for label, r in rows.items():
            hs = r.get("host_sleeps", "-")
            cs = r.get("card_sleeps", "-")
            lines.append(
                f"| {place} | {label} | {r['mean_us']:.2f} | {r['p50_us']:.2f} | "
                f"{r['p99_us']:.1f} | {hs} | {cs} | {r['n']} |"
            )
    lines.append("\nDMA copy, GB/s (1e9 B/s), host RAM window → card RAM, cache-hot:\n")
    lines.append("| size | memoryview `dst[:] = src` | `await dma.copy` | unaligned (CPU path) "
                 "| `dma.copy` in thread |")  # fmt: skip
    lines.append("|---|---|---|---|---|")
    for size, r in res["dma"]["sizes"].items():
        size = int(size)
        name = f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"
        th = f"{r['dma_thread']:.2f}" if "dma_thread" in r else "-"
        lines.append(
            f"| {name} | {r['memoryview']:.2f} | {r['dma']:.2f} | "
            f"{r['dma_unaligned_cpu']:.2f} | {th} |"
        )
    lines.append("\nEvent-loop stall while copying 16 MiB back to back (1 ms ticker lateness):\n")
    lines.append("| mode | GB/s | tick max ms | tick mean ms |")
    lines.append("|---|---|---|---|")
    for label, r in res["dma"]["stall_16MiB"].items():
        lines.append(
            f"| {label} | {r['gbps']:.2f} | {r['tick_max_ms']:.2f} | {r['tick_mean_ms']:.3f} |"
        )
    return "\n".join(lines)


async def main_async(quick: bool) -> dict[str, Any]:
    res: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "quick": quick,
        "python": platform.python_version(),
        "cpus": sorted(os.sched_getaffinity(0)),
        "loadavg": os.getloadavg(),
    }
    print("doorbells ...", file=sys.stderr)
    res["doorbell"] = await doorbell_bench(quick)
    print("dma ...", file=sys.stderr)
    res["dma"] = await dma_bench(quick)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run")
    ap.add_argument("--card", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.card:
        asyncio.run(card_main(args.card))
        return 0
    res = asyncio.run(main_async(args.quick))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str))
    tmp.replace(RESULTS)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
