"""One request at a time: latency of block, console and net against the round-trip floor.

Measured in one run (issue 19), every row as p50 / p99 and p50 / floor:

- ``floor``: two asyncio processes ping-pong over a pair of eventfds with
  ``loop.add_reader`` and no spinning: one host -> card -> host round trip with
  one wake-up on each side, the cost Python itself allows. Measured before,
  between and after the other rows; their ratios use the median.
- ``block read`` / ``block write``: 4 KiB random reads / writes at queue depth
  1 from a card app (``bench.latency:card_block``, run inside ``mic-card``)
  into a DMA buffer, timed on the card, back to back.
  Each reports the daemon's and the card's CPU time and wake-ups per request
  and how often the card's loop slept (:func:`bench.tails.block_cost`).
- ``4 KiB random preadv``: the same reads by a local ``preadv`` loop on the
  same image (:func:`bench.tails.preadv_floor`): the page cache's own share.
- ``console echo``: one byte written on the host pty until the card shell's
  echo of it comes back, timed here (blocking reads, one wake-up).
- ``pty echo, no card`` (:func:`bench.floors.pty_floor`): the same client
  against an asyncio process that
  echoes on the pty's master from its reader callback: what the kernel's pty
  costs (each direction goes through a kworker, ``tty_flip_buffer_push``), the
  part of the console row no change to this code can remove. Reported with
  its ratio to the floor; no goal of its own.
- ``net ping``: ICMP echo from the card's network namespace to the host
  address through the card's virtio-net NIC (``tap`` backend), back to back
  (a raw-socket pinger, one request at a time); ``net ping 10 ms`` is the same
  10 ms apart (the real ``ping -i 0.01``: every hop finds its peer asleep);
  ``veth ping`` is the kernel's own path between two namespaces. Needs root
  and iproute2; skipped with the reason otherwise.
- ``idle``: CPU used by the daemon and the card (``/proc/PID/stat``) while
  the card is online and nothing happens, over ``--idle`` seconds.

Goals (ratios to the floor of the same run): block and console p50 <= 2x,
net ping p50 <= 3x, every row's p99 <= 2x its own p50, idle < 1% of a CPU
each. ``MIC_TRACE`` (see ``virtio/trace.py``) adds a per-hop breakdown:
``--trace`` runs the block, console and net rows once more with it on, and
shows which hop grows in their slowest 1% (:func:`bench.tails.tail_breakdown`).
The floor's own p99 / p50 is printed with the others: the machine's yardstick
for the p99 goals.

Run: ``python -m bench.latency [--quick] [--rows floor,block,console,net,idle]``;
writes ``bench/results/latency.json``. The module imports only the standard
library at the top, so the card process can import :func:`card_block`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench import config
from bench.tails import (
    POLL_COUNTERS,
    block_run,
    net_cost,
    preadv_floor,
    tail_breakdown,
    warm_page_cache,
)

RESULTS = Path(__file__).with_name("results") / "latency.json"
MiB = 1 << 20
#: Goals of issue 19 (ratios of p50 to the floor; p99 to the row's own p50).
GOALS = {"block": 2.0, "console": 2.0, "net": 3.0, "p99_vs_p50": 2.0, "idle_cpu_pct": 1.0}
HOST_ADDR, CARD_ADDR = "172.31.1.254", "172.31.1.1"


def pct(xs: list[int], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``xs`` in µs (``xs`` in ns)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))] / 1000.0


def summary(samples: list[int]) -> dict[str, Any]:
    return {
        "n": len(samples),
        "p50_us": round(pct(samples, 0.5), 1),
        "p99_us": round(pct(samples, 0.99), 1),
        "mean_us": round(statistics.fmean(samples) / 1000.0, 1),
    }


# ----------------------------------------------------------------- card apps


async def card_block(card: Any, dev: str, write: bool, n: int) -> dict[str, Any]:
    """Card app: ``n`` 4 KiB random reads (or writes) at depth 1 into a DMA buffer;
    the latency of each, in ns, timed on the card."""
    blk = card.device(dev)
    nblocks = blk.capacity // 8
    rng = random.Random(19)
    buf = blk.buffer(4096)
    buf.view[:] = bytes(range(256)) * 16
    clock = time.perf_counter_ns
    lat: list[int] = []
    warm = max(50, n // 10)
    # The card loop's poll counters (transport.spinloop.SpinSelector; none on a
    # plain loop): how often it slept, and why, over the timed requests.
    sel = getattr(asyncio.get_running_loop(), "_selector", None)
    c0: dict[str, int] = {}
    try:
        for i in range(n + warm):
            if i == warm:
                c0 = {k: getattr(sel, k) for k in POLL_COUNTERS if hasattr(sel, k)}
            sector = rng.randrange(nblocks) * 8
            t0 = clock()
            if write:
                await blk.write(sector, buf)
            else:
                await blk.read_into(sector, buf)
            if i >= warm:
                lat.append(clock() - t0)
    finally:
        buf.close()
    return {"lat_ns": lat, "card_loop": {k: getattr(sel, k) - v for k, v in c0.items()}}


# ----------------------------------------------------------------- host side


def trace_env(trace_dir: Path | None) -> dict[str, str]:
    return {"MIC_TRACE": str(trace_dir)} if trace_dir is not None else {}


def console_echo(path: str, n: int) -> list[int]:
    """Type one byte on the console pty and wait for its echo; erase it (untimed)."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    clock = time.perf_counter_ns
    out: list[int] = []

    def read_exact(k: int, deadline: float) -> bytes:
        got = b""
        while len(got) < k:
            if time.monotonic() > deadline:
                raise TimeoutError(f"console: waited for {k} bytes, got {got!r}")
            got += os.read(fd, k - len(got))
        return got

    try:
        os.set_blocking(fd, False)  # discard what nobody read, then sync on a prompt
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 65536):
                pass
        os.set_blocking(fd, True)
        os.write(fd, b"\x15\r")
        buf = b""
        deadline = time.monotonic() + 10
        while not buf.endswith(b":~# "):
            buf += read_exact(1, deadline)
        time.sleep(0.3)  # a prompt still on its way (the boot's, or ours) is discarded too
        os.set_blocking(fd, False)
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 65536):
                pass
        os.set_blocking(fd, True)
        warm = max(20, n // 10)
        for i in range(n + warm):
            t0 = clock()
            os.write(fd, b"x")
            echo = read_exact(1, time.monotonic() + 5)
            dt = clock() - t0
            other = b""
            while echo != b"x":  # card output in between (a log line): not a sample
                other += echo
                if len(other) > 4096:
                    raise RuntimeError(f"console: no echo of b'x' in {other[-80:]!r}")
                echo = read_exact(1, time.monotonic() + 5)
            os.write(fd, b"\x7f")
            read_exact(3, time.monotonic() + 5)  # "\b \b"
            if i >= warm and not other:
                out.append(dt)
        return out
    finally:
        os.close(fd)


async def block_and_console(
    n: int, runs: int, trace_dir: Path | None, idle_s: float, parts: str = "block,console"
) -> dict[str, Any]:
    import mic_host

    tmp = Path(tempfile.mkdtemp(prefix="micl", dir="/tmp"))
    image = tmp / "lat.img"
    with image.open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(MiB))
    image.read_bytes()  # page cache: the rows measure the stack, not the disk
    res: dict[str, Any] = {}
    try:
        async with mic_host.launch(
            tmp / "state",
            config.card(config.device("console"), config.block(image), card_ram="64M"),
            env=trace_env(trace_dir),
        ) as client:
            card = client.card("mic0")
            await card.wait("online", timeout=60)
            if idle_s > 0:
                st = await card.status()
                res["idle"] = await idle_cpu(
                    {"daemon": int((await client.ping())["pid"]), "card": int(st["pid"])}, idle_s
                )
            if "block" in parts:
                # Again, after the boot and the idle phase: this VM's DAMON pages
                # out unmapped file pages idle for a minute (docs/latency.md, 18).
                warm_page_cache(image)
                res["preadv"] = [preadv_floor(image, n) for _ in range(runs)]
                pids = {
                    "daemon": int((await client.ping())["pid"]),
                    "card": int((await card.status())["pid"]),
                }
            for write in (False, True) if "block" in parts else ():
                key = "block_write" if write else "block_read"
                got = [await block_run(card, pids, write, n) for _ in range(runs)]
                res[key] = [lat for lat, _, _ in got]
                res[f"{key}_cost"] = {
                    k: round(statistics.median(c[k] for _, c, _ in got), 3) for k in got[0][1]
                }
                res[f"{key}_neighbours"] = [near for _, _, near in got]
            if "console" in parts:
                path = await card.console_path()
                res["console"] = [
                    await asyncio.to_thread(console_echo, path, max(200, n // 2))
                    for _ in range(runs)
                ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Percent of one CPU each process used over ``seconds`` of doing nothing."""
    await asyncio.sleep(1.0)  # let the boot settle
    hz = os.sysconf("SC_CLK_TCK")
    before = {k: _cpu_ticks(p) for k, p in pids.items()}
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    dt = time.monotonic() - t0
    return {
        f"{k}_pct": round(100.0 * (_cpu_ticks(p) - before[k]) / hz / dt, 3) for k, p in pids.items()
    }


# ----------------------------------------------------------------- net

PINGER = r"""
import os, socket, struct, sys, time
addr, n, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.connect((addr, 0))
s.settimeout(2.0)
ident = os.getpid() & 0xFFFF
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xFFFF)
    return ~(t + (t >> 16)) & 0xFFFF
payload = bytes(56)
clock = time.perf_counter_ns
out = []
for seq in range(n + warm):
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF)
    pkt = struct.pack("!BBHHH", 8, 0, csum(hdr + payload), ident, seq & 0xFFFF) + payload
    t0 = clock()
    s.send(pkt)
    while True:
        r = s.recv(2048)
        ihl = (r[0] & 0x0F) * 4
        t, _, _, rid, rseq = struct.unpack_from("!BBHHH", r, ihl)
        if t == 0 and rid == ident and rseq == seq & 0xFFFF:
            break
    if seq >= warm:
        out.append(clock() - t0)
print(" ".join(map(str, out)))
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def namespaces(*names: str) -> Any:
    try:
        for name in names:
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        yield
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


async def pinger(ns: str, addr: str, n: int) -> list[int]:
    warm = str(max(20, n // 10))
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, "-c", PINGER, addr, str(n), warm,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"pinger in {ns} failed: {err.decode()[-400:]}")
    return [int(x) for x in out.split()]


async def real_ping(ns: str, addr: str, n: int, interval: float) -> list[int]:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, "ping", "-n", "-c", str(n), "-i", str(interval), addr,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    lat = [
        int(float(line.split("time=")[1].split()[0]) * 1e6)
        for line in out.decode().splitlines()
        if "time=" in line
    ]
    if not lat:
        raise RuntimeError(f"ping in {ns} failed: {out.decode()[-300:]} {err.decode()[-300:]}")
    return lat[1:]  # the first one pays ARP


@contextlib.asynccontextmanager
async def card_net(state: Path, hns: str, cns: str, trace_dir: Path | None) -> AsyncIterator[Any]:
    """:func:`bench.net.card_net` with the trace's environment (``MIC_TRACE``)."""
    from bench.net import card_net as tap_card

    async with tap_card(state, hns, cns, env=trace_env(trace_dir)) as card:
        yield card


def net_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices, raw ICMP sockets)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    try:
        from transport.tap import tap_privilege_problem
    except ImportError:  # pragma: no cover
        return None
    return tap_privilege_problem()


async def net(n: int, runs: int, trace_dir: Path | None, spaced: bool) -> dict[str, Any]:
    res: dict[str, Any] = {}
    a, b = f"mvla-{uuid.uuid4().hex[:5]}", f"mvlb-{uuid.uuid4().hex[:5]}"
    with namespaces(a, b):
        ip("link", "add", "mvla", "netns", a, "type", "veth", "peer", "name", "mvlb", "netns", b)
        ip("-n", a, "addr", "add", "10.203.0.1/24", "dev", "mvla")
        ip("-n", b, "addr", "add", "10.203.0.2/24", "dev", "mvlb")
        ip("-n", a, "link", "set", "mvla", "up")
        ip("-n", b, "link", "set", "mvlb", "up")
        res["veth"] = [await pinger(a, "10.203.0.2", n) for _ in range(runs)]
    hns, cns = f"mvlh-{uuid.uuid4().hex[:5]}", f"mvlc-{uuid.uuid4().hex[:5]}"
    state = Path(tempfile.mkdtemp(prefix="micl", dir="/tmp"))
    try:
        with namespaces(hns):
            async with card_net(state, hns, cns, trace_dir) as card:
                await real_ping(cns, HOST_ADDR, 3, 0.05)  # ARP, both ways
                res["net"] = []
                costs = []
                for _ in range(runs):
                    warm = max(20, n // 10)
                    c = await net_cost(card, n + warm, lambda: pinger(cns, HOST_ADDR, n))
                    res["net"].append(c.pop("samples"))
                    costs.append(c)
                res["net_cost"] = {
                    k: round(statistics.median(c[k] for c in costs), 2) for k in costs[0]
                }
                if spaced:
                    res["net_spaced"] = [await real_ping(cns, HOST_ADDR, min(n, 300), 0.01)]
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return res


# ----------------------------------------------------------------- trace


def collect_trace(trace_dir: Path, what: str) -> dict[str, Any]:
    """Merge every process's trace file and break each request into hop-to-hop steps;
    ``tail``: the same for the slowest 1% (:func:`bench.tails.tail_breakdown`)."""
    from transport.tracing import load
    from virtio.trace import CARD_TAP_IN, PTY_IN, SUBMIT, breakdown

    marks = load(trace_dir)
    start = {"block": SUBMIT, "console": PTY_IN, "net": CARD_TAP_IN}[what]
    return {**breakdown(marks, start=start), "tail": tail_breakdown(marks, start)}


# ----------------------------------------------------------------- main


def _median_stats(runs: list[list[int]]) -> dict[str, Any]:
    per = [summary(r) for r in runs if r]
    return {
        "n": sum(p["n"] for p in per),
        "p50_us": round(statistics.median(p["p50_us"] for p in per), 1),
        "p99_us": round(statistics.median(p["p99_us"] for p in per), 1),
        "mean_us": round(statistics.median(p["mean_us"] for p in per), 1),
        "runs": [(p["p50_us"], p["p99_us"]) for p in per],
    }


ROWS: tuple[tuple[str, str, str | None], ...] = (
    # key, label, goal group
    ("block_read", "block 4 KiB random read, QD1", "block"),
    ("block_write", "block 4 KiB random write, QD1", "block"),
    ("preadv", "4 KiB random preadv, no card (page cache)", None),
    ("console", "console echo (host pty)", "console"),
    ("pty", "pty echo, no card (kernel pty floor)", None),
    ("net", "net ping card -> host, back to back", "net"),
    ("net_spaced", "net ping card -> host, 10 ms apart", None),
    ("veth", "veth ping, back to back (kernel)", None),
)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    rows = set(args.rows.split(","))
    n, runs = (300, 1) if args.quick else (args.n, args.runs)
    floors: list[list[int]] = []

    # Imported here, not at the top: the card imports this module for card_block.
    from bench.floors import floor, pty_floor

    async def take_floor() -> None:
        # In a thread: floor() forks and runs its own loops, away from this one.
        floors.append(await asyncio.to_thread(floor, max(1000, n)))

    raw: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    await take_floor()
    if rows & {"block", "console", "idle"}:
        parts = ",".join(rows & {"block", "console"})
        bc = await block_and_console(n, runs, None, args.idle if "idle" in rows else 0.0, parts)
        raw.update(bc)
        if "console" in rows:
            raw["pty"] = [
                await asyncio.to_thread(pty_floor, max(1000, n)) for _ in range(max(1, runs))
            ]
        await take_floor()
    if "net" in rows:
        problem = net_problem()
        if problem is None:
            raw.update(await net(n, runs, None, spaced=True))
        else:
            skipped["net"] = problem
        await take_floor()
    trace: dict[str, Any] = {}
    if args.trace:
        for what in ("block", "console", "net"):
            if what not in rows or (what == "net" and net_problem() is not None):
                continue
            tdir = Path(tempfile.mkdtemp(prefix="mict", dir="/tmp"))
            try:
                if what == "net":
                    await net(min(n, 500), 1, tdir, spaced=False)
                else:
                    await block_and_console(min(n, 500), 1, tdir, 0.0, what)
                trace[what] = collect_trace(tdir, what)
            finally:
                shutil.rmtree(tdir, ignore_errors=True)
    fl = _median_stats(floors)
    # The floor's own tail is the machine's yardstick for the p99 goals: what
    # one wake-up on each side varies by here, with nothing of ours in it.
    fl_tail = round(fl["p99_us"] / fl["p50_us"], 2)
    out_rows: list[dict[str, Any]] = [{"key": "floor", "label": "floor (eventfd ping-pong)", **fl,
                                       "ratio": 1.0, "p99_vs_p50": fl_tail, "goal": None,
                                       "met": None}]  # fmt: skip
    for key, label, goal_key in ROWS:
        if key not in raw:
            continue
        st = _median_stats(raw[key])
        ratio = round(st["p50_us"] / fl["p50_us"], 2)
        goal = GOALS[goal_key] if goal_key else None
        tail = round(st["p99_us"] / st["p50_us"], 2)
        met = None
        if goal is not None:
            met = ratio <= goal and tail <= GOALS["p99_vs_p50"]
        out_rows.append({"key": key, "label": label, **st, "ratio": ratio, "p99_vs_p50": tail,
                         "goal": goal, "met": met})  # fmt: skip
    idle = raw.get("idle")
    return {
        "net_cost": raw.get("net_cost"),
        "block_cost": {
            k: raw[f"block_{k}_cost"] for k in ("read", "write") if f"block_{k}_cost" in raw
        },
        "block_neighbours": {
            k: raw[f"block_{k}_neighbours"] for k in ("read", "write") if f"block_{k}_cost" in raw
        },
        "floor_p99_vs_p50": fl_tail,
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": sys.version.split()[0],
        "code": args.label or _git_head(),
        "quick": args.quick,
        "n": n,
        "runs": runs,
        "loadavg": os.getloadavg(),
        "goals": GOALS,
        "rows": out_rows,
        "idle": None
        if idle is None
        else {
            **idle,
            "seconds": args.idle,
            "met": max(idle.values()) < GOALS["idle_cpu_pct"],
        },
        "skipped": skipped,
        "trace": trace,
    }


def _git_head() -> str:
    try:
        return subprocess.run(
            ["git", "log", "-1", "--format=%h %s"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    p.add_argument("--quick", action="store_true", help="300 requests per row, one run")
    p.add_argument("--n", type=int, default=2000, help="requests per run and row")
    p.add_argument("--runs", type=int, default=3, help="runs per row (medians are reported)")
    p.add_argument("--rows", default="floor,block,console,net,idle")
    p.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measurement")
    p.add_argument("--trace", action="store_true", help="also a per-hop breakdown (MIC_TRACE)")
    p.add_argument("--label", default="", help="what code this measures (default: git HEAD)")
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    res = asyncio.run(amain(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    print(f"latency ({res['code']}), load {res['loadavg'][0]:.2f}")
    for r in res["rows"]:
        goal = (
            ""
            if r["goal"] is None
            else f"  goal <= {r['goal']}x: {'met' if r['met'] else 'NOT met'}"
        )
        print(
            f"{r['label']:40} p50 {r['p50_us']:8.1f} µs  p99 {r['p99_us']:8.1f} µs  "
            f"x{r['ratio']:.2f}  p99/p50 {r.get('p99_vs_p50', 0):.2f}{goal}"
        )
    for k, c in res["block_cost"].items():
        print(f"block {k}, per request (CPU µs, wake-ups; card loop sleeps): {c}")
        print(f"block {k}, other tasks by CPU µs: {[r['top'] for r in res['block_neighbours'][k]]}")
    if res["net_cost"]:
        print(f"net ping, per ping (CPU µs, wake-ups): {res['net_cost']}")
    if res["idle"]:
        print(f"idle CPU: {res['idle']}")
    for k, why in res["skipped"].items():
        print(f"{k}: skipped ({why})")
    for what, t in res["trace"].items():
        tail = t.pop("tail", None)
        print(f"trace {what}: {json.dumps(t)}")
        print(f"trace {what}, slowest 1%: {json.dumps(tail)}")
        t["tail"] = tail
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
