"""What a row's tail is made of: the tools :mod:`bench.latency` reports it with (issue 19).

- :func:`preadv_floor`: the block read row's page-cache floor, a local
  ``preadv`` loop in the bench process over the same image, in the same run:
  if it had the same tail, the tail would be the machine's;
- :func:`tail_breakdown`: which hop grows in the slowest 1% of a traced row
  (``MIC_TRACE``), against the same hop in every request;
- :func:`block_cost` and :func:`net_cost` (with :func:`proc_cost`): the
  daemon's and the card's CPU time and wake-ups per block request or ping,
  and how often the card's loop slept: the mechanism of the tail, as a
  request in which either side slept pays a full wake-up, and a figure that
  depends far less on the load than the latency;
- :func:`tasks_cpu` / :func:`neighbours`: the CPU time every other task of
  the machine used during a row (kernel threads included: this VM's
  ``kdamond.0`` runs ~2.3 ms every ~0.4 s), by name: with two vCPUs both
  held by the daemon and the card, any of it lands inside some request;
- :func:`warm_page_cache`: the block rows' image read through again right
  before them (this VM's DAMON pages out file pages left idle for a minute).

Standard library only (the card imports :mod:`bench.latency`, which imports this).
"""

from __future__ import annotations

import itertools
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

__all__ = [
    "POLL_COUNTERS",
    "block_cost",
    "block_run",
    "neighbours",
    "net_cost",
    "preadv_floor",
    "proc_cost",
    "tail_breakdown",
    "tasks_cpu",
    "warm_page_cache",
]

#: ``transport.spinloop.SpinSelector`` counters the block rows report for the card's loop.
POLL_COUNTERS = ("spins", "spin_hits", "contended", "preempted", "sleeps")


def warm_page_cache(path: Path) -> None:
    """Read ``path`` through, so the block rows find it in the page cache."""
    with path.open("rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


def preadv_floor(image: Path, n: int) -> list[int]:
    """``n`` 4 KiB random ``preadv`` of ``image`` in this process, timed: what the
    page cache itself costs the block read row, and whether its tail is the
    machine's (a cold page, a preempted syscall) rather than ours. Its own
    seed: the block rows' blocks (seed 19) are not read ahead of them."""
    fd = os.open(image, os.O_RDONLY)
    try:
        nblocks = os.fstat(fd).st_size // 4096
        rng = random.Random(20)
        buf = bytearray(4096)
        clock = time.perf_counter_ns
        out: list[int] = []
        warm = max(50, n // 10)
        for i in range(n + warm):
            off = rng.randrange(nblocks) * 4096
            t0 = clock()
            os.preadv(fd, [buf], off)
            if i >= warm:
                out.append(clock() - t0)
        return out
    finally:
        os.close(fd)


def tail_breakdown(
    marks: list[tuple[int, int]], start: int, q: float = 0.99, max_episode_ns: int = 50_000_000
) -> dict[str, Any]:
    """Which step grows in the slow requests: in the slowest ``1 - q`` of the
    episodes (as in :func:`virtio.trace.breakdown`), each step's median against
    its median in all episodes, and how many slow episodes each step is the
    main culprit of (the step with the largest excess over its own median)."""
    from virtio.trace import HOPS

    eps: list[list[tuple[int, int]]] = []
    for hop, t in sorted(marks, key=lambda m: m[1]):
        if hop == start:
            eps.append([(hop, t)])
        elif eps:
            eps[-1].append((hop, t))
    eps = [e for e in eps[:-1] if len(e) > 1 and e[-1][1] - e[0][1] <= max_episode_ns]
    if len(eps) < 100:
        return {"episodes": len(eps)}
    per: list[tuple[int, dict[str, int]]] = []
    for e in eps:
        steps: dict[str, int] = {}
        for (a, ta), (b, tb) in itertools.pairwise(e):
            key = f"{HOPS[a]} -> {HOPS[b]}"
            steps[key] = steps.get(key, 0) + tb - ta
        per.append((e[-1][1] - e[0][1], steps))
    per.sort(key=lambda p: p[0])
    slow = [st for _, st in per[-max(1, round((1 - q) * len(per))) :]]
    cut = per[-len(slow)][0]
    typical = {
        k: statistics.median(st.get(k, 0) for _, st in per)
        for k in {k for _, st in per for k in st}
    }
    blamed: dict[str, int] = {}
    for st in slow:
        k = max(st, key=lambda k: st[k] - typical[k])
        if st[k] > typical[k]:
            blamed[k] = blamed.get(k, 0) + 1
    rows: list[dict[str, Any]] = [
        {
            "step": k,
            "p50_us": round(typical[k] / 1e3, 1),
            "slow_p50_us": round(statistics.median(st.get(k, 0) for st in slow) / 1e3, 1),
            "blamed": blamed.get(k, 0),
        }
        for k in typical
    ]
    rows.sort(key=lambda r: (-r["blamed"], -(r["slow_p50_us"] - r["p50_us"])))
    return {
        "q": q,
        "episodes": len(per),
        "slow": len(slow),
        "threshold_us": round(cut / 1e3, 1),
        "steps": [r for r in rows if r["blamed"] or r["slow_p50_us"] > r["p50_us"] + 1][:8],
    }


def proc_cost(pid: int) -> tuple[int, int]:
    """(ns on a CPU, voluntary context switches i.e. sleeps) of every thread of ``pid``."""
    ns = sleeps = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ns += int((task / "schedstat").read_text().split()[0])
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    sleeps += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return ns, sleeps


def block_cost(
    before: dict[str, tuple[int, int]],
    after: dict[str, tuple[int, int]],
    n: int,
    card_loop: dict[str, int] | None,
) -> dict[str, float]:
    """Per request of a ``bench.latency:card_block`` run of ``n`` timed requests:
    CPU µs and wake-ups of each process (:func:`proc_cost` before and after the
    run, so its warm-up counts too), and how often the card's loop slept and
    stood down for crowding (its ``SpinSelector`` counters over the timed
    requests). A request in which either side slept paid a full wake-up: when
    they add up to more than ~1% of requests, the p99 holds one."""
    reqs = n + max(50, n // 10)  # card_block's warm-up
    cost = {
        f"{k}_{what}": round((after[k][i] - before[k][i]) / div / reqs, 3)
        for k in before
        for i, what, div in ((0, "cpu_us", 1e3), (1, "wakeups", 1))
    }
    if card_loop and "sleeps" in card_loop:
        cost["card_loop_sleeps"] = round(card_loop["sleeps"] / n, 4)
        cost["card_loop_contended"] = round(card_loop.get("contended", 0) / n, 4)
    return cost


async def net_cost(card: Any, pings: int, run: Any) -> dict[str, float]:
    """CPU µs and wake-ups (voluntary context switches) per ping of the daemon and
    the card while ``run()`` pings ``pings`` times: what the path costs, which
    unlike the latency barely depends on what else the machine runs."""
    pids = {
        "daemon": int((await card.client.request("ping"))["pid"]),
        "card": int((await card.status())["pid"]),
    }
    before = {k: proc_cost(p) for k, p in pids.items()}
    out = await run()
    after = {k: proc_cost(p) for k, p in pids.items()}
    cost: dict[str, float] = {}
    for k in pids:
        cost[f"{k}_cpu_us"] = round((after[k][0] - before[k][0]) / 1e3 / pings, 1)
        cost[f"{k}_wakeups"] = round((after[k][1] - before[k][1]) / pings, 2)
    return {**cost, "samples": out}


def tasks_cpu() -> dict[tuple[int, int], tuple[str, int]]:
    """Every task of the machine, ``(pid, tid) -> (name, ns on a CPU)``
    (``/proc/*/task/*/schedstat``); tasks that end meanwhile are skipped."""
    out: dict[tuple[int, int], tuple[str, int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            tasks = list((proc / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                ns = int((task / "schedstat").read_text().split()[0])
                name = (task / "comm").read_text().strip()
            except (OSError, ValueError, IndexError):
                continue
            out[(int(proc.name), int(task.name))] = (name, ns)
    return out


def neighbours(
    before: dict[tuple[int, int], tuple[str, int]],
    after: dict[tuple[int, int], tuple[str, int]],
    ours: set[int],
    seconds: float,
    top: int = 3,
) -> dict[str, Any]:
    """What the tasks not in ``ours`` (pids) ran between two :func:`tasks_cpu`:
    in % of one CPU over ``seconds``, and the ``top`` ones by name (µs)."""
    by_name: dict[str, int] = {}
    for key, (name, ns) in after.items():
        if key[0] in ours:
            continue
        used = ns - before.get(key, (name, 0))[1]
        if used > 0:
            by_name[name] = by_name.get(name, 0) + used
    total = sum(by_name.values())
    worst = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {
        "others_cpu_pct": round(100.0 * total / 1e9 / max(seconds, 1e-9), 2),
        "top": [(name, round(ns / 1e3)) for name, ns in worst],
    }


async def block_run(
    card: Any, pids: dict[str, int], write: bool, n: int
) -> tuple[list[int], dict[str, float], dict[str, Any]]:
    """One run of ``bench.latency:card_block`` on ``card`` (a client's card):
    its latencies (ns), :func:`block_cost` with ``others_cpu_pct`` (what every
    other task ran meanwhile, % of one CPU), and :func:`neighbours`."""
    before = {k: proc_cost(p) for k, p in pids.items()}
    m0, t0 = tasks_cpu(), time.monotonic()
    r = await card.run("bench.latency:card_block", "vda", write, n)
    dt, m1 = time.monotonic() - t0, tasks_cpu()
    after = {k: proc_cost(p) for k, p in pids.items()}
    cost = block_cost(before, after, n, r["value"].get("card_loop"))
    near = neighbours(m0, m1, {*pids.values(), os.getpid()}, dt)
    cost["others_cpu_pct"] = near["others_cpu_pct"]
    return r["value"]["lat_ns"], cost, near
