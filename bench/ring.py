"""Ring-core benchmark: MIC-VOP's split ring against a bare struct ring and a Pipe.

Every variant does the same work per request: the driver copies a payload into
a shared buffer and makes it available; the device takes it, copies it to
device-local memory (the emulated DMA) and returns it as used; the driver
reaps it. Measured in the same run:

- ``ceiling``: a minimal hand-written split ring (precompiled ``struct`` and
  ``memoryview.cast``, no validation at all): the fastest Python can go;
- ``mic-vop``: :class:`virtio.split.DriverQueue` + :class:`DeviceQueue`,
  with every check a hostile peer needs;
- ``packed``: :class:`virtio.packed.DriverQueue` + :class:`DeviceQueue`
  (the packed ring, same checks, same calls), measured next to ``mic-vop``;
- ``pipe``: ``multiprocessing.Pipe`` request/response (two processes only).

Modes: ``1proc`` (driver and device alternate in one loop: pure core cost)
and ``2proc`` (device in a forked process on the other core, both busy-poll
over shared memory, as a PCIe peer would). Prints a table and writes
``bench/results/ring.json`` with the ratios.

The ring core runs as built: compiled with mypyc after ``make install``
(``tools/mypyc_build.py``), or its Python sources with ``MIC_PURE_PYTHON=1``;
``ring_core`` in the JSON says which. ``--ab-pure N`` measures both, A/B
interleaved in the same minutes (N rounds of: compiled run, pure run, each a
fresh process), and writes the medians and the compiled/pure ratios of every
cell to ``bench/results/ring-ab-pure.json``.

Run: ``python -m bench.ring [--quick] [--seconds S]``,
``python -m bench.ring --ab-pure 3``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tools import pure_python

pure_python.install_from_env()  # MIC_PURE_PYTHON=1: the ring core's sources (before virtio)

import virtio.split.driver  # noqa: E402
from virtio import packed  # noqa: E402
from virtio.constants import Feature  # noqa: E402
from virtio.memory import FlatMemory  # noqa: E402
from virtio.split import DeviceQueue, DriverQueue, SplitLayout  # noqa: E402

QSIZE = 256
RING_BASE = 0
BUF_BASE = 0x10000
BUF_STRIDE = 4096
LOCAL_BASE = BUF_BASE + QSIZE * BUF_STRIDE
CTRL = LOCAL_BASE + BUF_STRIDE  # stop flag + request counter for 2proc
MEM_SIZE = CTRL + 4096
RESULTS = Path(__file__).with_name("results") / "ring.json"
AB_RESULTS = Path(__file__).with_name("results") / "ring-ab-pure.json"


def ring_core() -> str:
    """Which ring core this process runs: ``compiled`` (mypyc) or ``pure``."""
    return "pure" if (virtio.split.driver.__file__ or "").endswith(".py") else "compiled"


_DESC = struct.Struct("<QIHH")
_ELEM = struct.Struct("<II")


# --------------------------------------------------------------------------
# The ceiling: a bare split ring with no checks at all.
class MiniDriver:
    def __init__(self, mv: memoryview, lay: SplitLayout) -> None:
        self.mv, self.n = mv, lay.size
        self.avail = mv[lay.avail : lay.avail + lay.avail_bytes].cast("H")
        self.used = mv[lay.used : lay.used + lay.used_bytes].cast("H")
        self.used_i = mv[lay.used + 4 : lay.used + 4 + 8 * lay.size].cast("I")
        self.desc_off = lay.desc
        self.shadow = self.last = 0

    def add(self, slot: int, addr: int, length: int) -> None:
        _DESC.pack_into(self.mv, self.desc_off + 16 * slot, addr, length, 0, 0)
        self.avail[2 + (self.shadow & (self.n - 1))] = slot
        self.shadow = (self.shadow + 1) & 0xFFFF

    def publish(self) -> None:
        self.avail[1] = self.shadow

    def reap(self) -> int:
        got = 0
        while self.last != self.used[1]:
            _ = self.used_i[2 * (self.last & (self.n - 1))]
            self.last = (self.last + 1) & 0xFFFF
            got += 1
        return got


class MiniDevice:
    def __init__(self, mv: memoryview, lay: SplitLayout) -> None:
        self.mv, self.n = mv, lay.size
        self.avail = mv[lay.avail : lay.avail + lay.avail_bytes].cast("H")
        self.used = mv[lay.used : lay.used + lay.used_bytes].cast("H")
        self.desc_off = lay.desc
        self.used_off = lay.used + 4
        self.next_avail = self.next_used = 0

    def serve(self, local: memoryview) -> int:
        mv, n = self.mv, self.n
        idx = self.avail[1]
        done = 0
        while self.next_avail != idx:
            head = self.avail[2 + (self.next_avail & (n - 1))]
            addr, length, _f, _x = _DESC.unpack_from(mv, self.desc_off + 16 * head)
            local[:length] = mv[addr : addr + length]
            _ELEM.pack_into(mv, self.used_off + 8 * (self.next_used & (n - 1)), head, 0)
            self.next_avail = (self.next_avail + 1) & 0xFFFF
            self.next_used = (self.next_used + 1) & 0xFFFF
            done += 1
        if done:
            self.used[1] = self.next_used
        return done


# --------------------------------------------------------------------------
FEATURES = int(Feature.EVENT_IDX)


def _make(kind: str, mv: memoryview, role: str) -> tuple[Callable[..., object], ...]:
    """Return (add, publish, reap) for a driver, or (serve,) for a device."""
    lay = SplitLayout.contiguous(RING_BASE, QSIZE)
    if kind == "ceiling":
        if role == "driver":
            d = MiniDriver(mv, lay)
            return d.add, d.publish, d.reap
        dv = MiniDevice(mv, lay)
        return (dv.serve,)
    mem = FlatMemory(mv)
    if kind == "packed":
        return _make_packed(mem, role)
    if role == "driver":
        q: DriverQueue[int] = DriverQueue(mem, lay, FEATURES)

        def add(slot: int, addr: int, length: int) -> None:
            q.add(((addr, length),), (), slot)

        def reap() -> int:
            return len(q.get_used_many())

        return add, q.publish, reap
    dq = DeviceQueue(mem, lay, FEATURES)
    dq.activate()
    dq.disable_notifications()

    def serve(local: memoryview) -> int:
        chains = dq.pop_many()
        if not chains:
            return 0
        for c in chains:
            seg = c.readable[0]
            local[: len(seg)] = seg
        dq.add_used_many([(c.head, 0) for c in chains])
        dq.publish_used()
        return len(chains)

    return (serve,)


def _make_packed(mem: FlatMemory, role: str) -> tuple[Callable[..., object], ...]:
    """The same calls on the packed ring (virtio.packed has the split ring's shape)."""
    lay = packed.PackedLayout.contiguous(RING_BASE, QSIZE)
    if role == "driver":
        q: packed.DriverQueue[int] = packed.DriverQueue(mem, lay, FEATURES)

        def add(slot: int, addr: int, length: int) -> None:
            q.add(((addr, length),), (), slot)

        def reap() -> int:
            return len(q.get_used_many())

        return add, q.publish, reap
    dq = packed.DeviceQueue(mem, lay, FEATURES)
    dq.activate()
    dq.disable_notifications()

    def serve(local: memoryview) -> int:
        chains = dq.pop_many()
        if not chains:
            return 0
        for c in chains:
            seg = c.readable[0]
            local[: len(seg)] = seg
        dq.add_used_many([(c.head, 0) for c in chains])
        dq.publish_used()
        return len(chains)

    return (serve,)


#: CPU µs per request of the last run_1proc call per kind (process time: what
#: the ring costs, whatever else the machine runs)
CPU_US: dict[str, list[float]] = {}


def run_1proc(kind: str, batch: int, size: int, seconds: float) -> float:
    mv = memoryview(mmap.mmap(-1, MEM_SIZE))
    add, publish, reap = _make(kind, mv, "driver")
    (serve,) = _make(kind, mv, "device")
    local = memoryview(bytearray(BUF_STRIDE))
    payload = os.urandom(size)
    done = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for i in range(batch):
            a = BUF_BASE + i * BUF_STRIDE
            mv[a : a + size] = payload
            add(i, a, size)
        publish()
        serve(local)
        done += reap()  # type: ignore[operator]
        if (done & 1023) < batch and time.perf_counter() > deadline:
            break
    rate = done / (time.perf_counter() - t0)
    CPU_US.setdefault(kind, []).append((time.process_time() - c0) / done * 1e6)
    return rate


def _device_proc(kind: str, shm: mmap.mmap, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    mv = memoryview(shm)
    ctrl = mv[CTRL : CTRL + 8].cast("I")
    (serve,) = _make(kind, mv, "device")
    local = memoryview(bytearray(BUF_STRIDE))
    ctrl[1] = 1  # ready
    while not ctrl[0]:
        serve(local)


def run_2proc(kind: str, batch: int, size: int, seconds: float, cpus: tuple[int, int]) -> float:
    shm = mmap.mmap(-1, MEM_SIZE)
    mv = memoryview(shm)
    ctrl = mv[CTRL : CTRL + 8].cast("I")
    add, publish, reap = _make(kind, mv, "driver")
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_device_proc, args=(kind, shm, cpus[1]))
    p.start()
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})
    try:
        while not ctrl[1]:
            time.sleep(0.001)
        payload = os.urandom(size)
        done = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for i in range(batch):
                a = BUF_BASE + i * BUF_STRIDE
                mv[a : a + size] = payload
                add(i, a, size)
            publish()
            got = 0
            while got < batch:
                got += reap()  # type: ignore[operator]
            done += got
        rate = done / (time.perf_counter() - t0)
    finally:
        ctrl[0] = 1
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
        os.sched_setaffinity(0, old)
        # the shared mapping is released with its last view (closures hold some)
    return rate


def _pipe_child(conn: mp.connection.Connection, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    local = bytearray(BUF_STRIDE)
    while True:
        msg = conn.recv_bytes()
        if not msg:
            break
        local[: len(msg)] = msg
        conn.send_bytes(b"k")


def run_pipe(batch: int, size: int, seconds: float, cpus: tuple[int, int]) -> float:
    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_pipe_child, args=(b, cpus[1]))
    p.start()
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})
    try:
        payload = os.urandom(size)
        done = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(batch):
                a.send_bytes(payload)
            for _ in range(batch):
                a.recv_bytes()
            done += batch
        rate = done / (time.perf_counter() - t0)
        a.send_bytes(b"")
    finally:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
        a.close()
        b.close()
        os.sched_setaffinity(0, old)
    return rate


def median_of(runs: int, fn: Callable[..., float], *args: object) -> float:
    return statistics.median(fn(*args) for _ in range(runs))


_AB_FIELDS = (
    "micvop_rps",
    "packed_rps",
    "ceiling_rps",
    "pipe_rps",
    "micvop_cpu_us",
    "packed_cpu_us",
    "ceiling_cpu_us",
)


def run_ab_pure(rounds: int, seconds: float | None, runs: int, out: Path) -> int:
    """Compiled against pure, interleaved: ``rounds`` x (compiled run, pure run)."""
    cells: dict[str, dict[tuple[str, int, int], list[dict[str, object]]]] = {
        "compiled": {},
        "pure": {},
    }
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for variant in ("compiled", "pure"):
                js = Path(tmp) / f"{variant}-{r}.json"
                cmd = [sys.executable, "-m", "bench.ring", "--json", str(js), "--runs", str(runs)]
                if seconds:
                    cmd += ["--seconds", str(seconds)]
                env = {k: v for k, v in os.environ.items() if k != "MIC_PURE_PYTHON"}
                if variant == "pure":
                    env["MIC_PURE_PYTHON"] = "1"
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1}/{rounds}: {variant} (load {loads[-1]:.1f})", flush=True)
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                res = json.loads(js.read_text())
                if res["ring_core"] != variant:
                    print(f"{variant} run ran the {res['ring_core']} ring core: not built?")
                    return 1
                for row in res["rows"]:
                    key = (row["mode"], row["size"], row["batch"])
                    cells[variant].setdefault(key, []).append(row)
    rows: list[dict[str, object]] = []
    print(f"\ncompiled / pure, medians of {rounds} interleaved rounds; load {loads}")
    print("rate: compiled/pure requests per second; cpu: pure/compiled CPU per request")
    print(
        f"{'mode':6} {'size':>5} {'batch':>5} {'split':>8} {'packed':>8}"
        f" {'cpu split':>10} {'cpu packed':>10}  vs pipe (c / p)"
    )
    for key, comp in cells["compiled"].items():
        pure = cells["pure"][key]
        row: dict[str, object] = {"mode": key[0], "size": key[1], "batch": key[2]}
        for f in _AB_FIELDS:
            c = [x[f] for x in comp if x[f] is not None]
            p = [x[f] for x in pure if x[f] is not None]
            if c and p:
                row[f"compiled_{f}"] = statistics.median(c)  # type: ignore[type-var]
                row[f"pure_{f}"] = statistics.median(p)  # type: ignore[type-var]
        ratio = {
            f: row[f"compiled_{f}"] / row[f"pure_{f}"]  # type: ignore[operator]
            for f in ("micvop_rps", "packed_rps")
        }
        row["ratio_split"] = round(ratio["micvop_rps"], 3)
        row["ratio_packed"] = round(ratio["packed_rps"], 3)
        cpu_txt = ""
        for f in ("micvop", "packed"):
            c, p = row.get(f"compiled_{f}_cpu_us"), row.get(f"pure_{f}_cpu_us")
            if c and p:
                row[f"cpu_speedup_{f}"] = round(p / c, 3)  # type: ignore[operator]
                cpu_txt += f" {p / c:>9.2f}x"  # type: ignore[operator]
            else:
                cpu_txt += f" {'-':>10}"
        vp = "-"
        if "compiled_pipe_rps" in row:
            cvp = row["compiled_micvop_rps"] / row["compiled_pipe_rps"]  # type: ignore[operator]
            pvp = row["pure_micvop_rps"] / row["pure_pipe_rps"]  # type: ignore[operator]
            row["compiled_vs_pipe"], row["pure_vs_pipe"] = round(cvp, 2), round(pvp, 2)
            vp = f"{cvp:.2f}x / {pvp:.2f}x"
        rows.append(row)
        print(
            f"{key[0]:6} {key[1]:>5} {key[2]:>5} {ratio['micvop_rps']:>7.2f}x"
            f" {ratio['packed_rps']:>7.2f}x{cpu_txt}  {vp}"
        )
    result = {
        "bench": "ring-ab-pure",
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "rounds": rounds,
        "load_avg_1min": loads,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--runs", type=int, default=None, help="runs per cell (median)")
    ap.add_argument("--json", type=Path, default=None, help="where to write the results")
    ap.add_argument(
        "--ab-pure",
        type=int,
        metavar="ROUNDS",
        default=0,
        help="compiled vs pure-Python ring core, interleaved (needs make install's build)",
    )
    args = ap.parse_args(argv)
    if args.ab_pure:
        return run_ab_pure(args.ab_pure, args.seconds, args.runs or 1, args.json or AB_RESULTS)
    args.json = args.json or RESULTS
    seconds = args.seconds or (0.1 if args.quick else 0.4)
    runs = args.runs or (1 if args.quick else 3)
    cpus_avail = sorted(os.sched_getaffinity(0))
    two_cores = len(cpus_avail) >= 2
    cpus = (cpus_avail[0], cpus_avail[-1])

    rows: list[dict[str, object]] = []
    print(
        f"ring bench: queue {QSIZE}, {seconds}s x {runs} runs per cell, cpus {cpus_avail},"
        f" ring core {ring_core()}"
    )
    hdr = f"{'mode':6} {'size':>5} {'batch':>5} {'ceiling':>12} {'mic-vop':>12} {'pipe':>10}"
    print(hdr + f" {'vs ceiling':>10} {'vs pipe':>8} {'packed':>12} {'pk/split':>8}")
    for mode in ("1proc", "2proc"):
        if mode == "2proc" and not two_cores:
            print("2proc: skipped (busy polling needs two cores; one core would spin a slice)")
            continue
        for size in (64, 4096):
            for batch in (1, 32):
                cpu: dict[str, float] = {}
                if mode == "1proc":
                    CPU_US.clear()
                    ceil = median_of(runs, run_1proc, "ceiling", batch, size, seconds)
                    ours = median_of(runs, run_1proc, "micvop", batch, size, seconds)
                    pk = median_of(runs, run_1proc, "packed", batch, size, seconds)
                    cpu = {k: round(statistics.median(v), 3) for k, v in CPU_US.items()}
                    pipe = None
                else:
                    ceil = median_of(runs, run_2proc, "ceiling", batch, size, seconds, cpus)
                    ours = median_of(runs, run_2proc, "micvop", batch, size, seconds, cpus)
                    pk = median_of(runs, run_2proc, "packed", batch, size, seconds, cpus)
                    pipe = median_of(runs, run_pipe, batch, size, seconds, cpus)
                row: dict[str, object] = {
                    "mode": mode,
                    "size": size,
                    "batch": batch,
                    "ceiling_rps": round(ceil),
                    "micvop_rps": round(ours),
                    "pipe_rps": None if pipe is None else round(pipe),
                    "ratio_vs_ceiling": round(ours / ceil, 3),
                    "ratio_vs_pipe": None if pipe is None else round(ours / pipe, 2),
                    "packed_rps": round(pk),
                    "ratio_packed_vs_split": round(pk / ours, 3),
                    # 1proc only: CPU µs per request (driver + device + the bench's copies)
                    "ceiling_cpu_us": cpu.get("ceiling"),
                    "micvop_cpu_us": cpu.get("micvop"),
                    "packed_cpu_us": cpu.get("packed"),
                }
                rows.append(row)
                ps = "-" if pipe is None else f"{pipe:,.0f}"
                vp = "-" if pipe is None else f"{ours / pipe:.1f}x"
                print(
                    f"{mode:6} {size:>5} {batch:>5} {ceil:>12,.0f} {ours:>12,.0f} {ps:>10}"
                    f" {ours / ceil:>9.2f}x {vp:>8} {pk:>12,.0f} {pk / ours:>7.2f}x"
                )
    out = {
        "bench": "ring",
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": cpus_avail,
        "queue_size": QSIZE,
        "seconds": seconds,
        "runs": runs,
        "quick": args.quick,
        "ring_core": ring_core(),
        "targets": {"batch32_vs_ceiling": 0.5, "vs_pipe": 5.0},
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
