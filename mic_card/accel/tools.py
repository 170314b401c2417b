"""What the card shell shows of the accelerators: ``accel list`` and ``accel bench``.

The shell registers these (``accel_list_text(fw)``, ``await accel_bench(fw,
...)`` and ``format_bench(result)``); nothing here parses command lines except
:func:`bench_args`, which turns ``--alg A --size N ...`` into keywords.
The bench prints UADK's benchmark columns (``uadk_tool benchmark``): alg,
length, KiB/s, Kops, CPU % (of the submitting process: the engines run in
their own processes), average latency.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from typing import TYPE_CHECKING, Any

from mic_card.accel.providers.mic import MicProvider
from mic_card.accel.queue import AccelQueue, Request, SharedBuffer
from mic_card.accel.session import Session, SessionSpec
from mic_card.accel.wire import Op
from virtio.errors import LocalProtocolError

if TYPE_CHECKING:
    from mic_card.accel.api import Accelerators

__all__ = [
    "accel_bench",
    "accel_list_text",
    "bench_args",
    "bench_data",
    "bench_spec",
    "format_bench",
]


def accel_list_text(fw: Accelerators) -> str:
    """One block per device with its uacce attributes (``accel list``)."""
    lines = []
    for d in fw.devices.values():
        a = d.attrs()
        flags = "SVA" if a["flags"] & 1 else "-"
        lines.append(f"{d.name}: api={a['api']} flags={a['flags']} ({flags}) node={a['node_id']}")
        lines.append(
            f"  available_instances={a['available_instances']}/{d.spec.max_queues}"
            f" isolate={a['isolate']} isolate_strategy={a['isolate_strategy']}"
            f" faults(1h)={d.fault_count()} workers={d.spec.workers}"
        )
        lines.append(f"  algorithms: {' '.join(d.algorithms)}")
    return "\n".join(lines)


def bench_data(size: int, seed: int = 0) -> bytes:
    """Compressible text-like data (zlib-1 ratio ~2.5-3, like the perf baselines)."""
    rnd = random.Random(seed)
    words = [
        bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz", k=rnd.randint(2, 9))) for _ in range(2000)
    ]
    out = bytearray()
    while len(out) < size:
        out += rnd.choice(words) + (b" " if rnd.random() < 0.9 else b"\n")
    return bytes(out[:size])


def bench_spec(alg: str, op: str | None = None, level: int = 1) -> SessionSpec:
    """A session spec with fixed test keys for ``alg``."""
    a = alg.split("+")[-1]
    key = b""
    iv = b""
    if a.startswith("aes"):
        key = bytes(range(64)) if a == "aes-xts" else bytes(range(32))
        iv = bytes(12) if a == "aes-gcm" else bytes(range(16))
    elif a.startswith("hmac"):
        key = b"k" * 32
    return SessionSpec(alg, op=op, level=level, key=key, iv=iv)


async def accel_bench(
    fw: Accelerators,
    alg: str = "zlib",
    size: int = 4096,
    seconds: float = 1.0,
    *,
    batch: int = 1,
    mode: str = "sva",
    op: str | None = None,
    level: int = 1,
) -> dict[str, Any]:
    """Run ``alg`` on ``size``-byte requests for ``seconds``, ``batch`` in flight.

    The batch is spread over the device's queues (one engine each); each queue
    is refilled with its share (one doorbell) as soon as its share is done.

    ``mode`` ``sva`` uses buffers shared with the queues (zero copy); ``nosva``
    copies through the bounce pool. Returns the UADK columns as a dict.

    Raises:
        LocalProtocolError: bad arguments (unknown alg/mode, batch out of range).
        QueueBusy, DeviceIsolated: no queue could be opened.
    """
    if mode not in ("sva", "nosva"):
        raise LocalProtocolError(f"mode {mode!r}: sva or nosva")
    if not 1 <= batch <= 64 or size <= 0 or seconds <= 0:
        raise LocalProtocolError("batch must be 1..64, size and seconds positive")
    spec = bench_spec(alg, op, level)
    op_, a1, _ = spec.resolved()
    devs = fw.find(alg)
    if not devs:
        raise LocalProtocolError(f"no accelerator offers {alg!r}")
    dev = next((d for d in devs if not d.isolate and (mode == "nosva" or d.spec.sva)), devs[0])
    if mode == "sva" and not dev.spec.sva:
        raise LocalProtocolError(f"{dev.name} has no SVA: use --mode nosva")
    prov = MicProvider(fw)
    try:
        qs = await prov.queues(dev)
        sess = Session(qs, spec)
        data = bench_data(size)
        if op_ in (Op.DECOMPRESS, Op.DECRYPT):
            src_data = await _prepare(qs, spec, data)
        else:
            src_data = data
        # pre-built requests: (queue, [(Request, tag)]) round robin, as UADK pre-fills BDs
        per: dict[int, tuple[AccelQueue, list[tuple[Request, Any]]]] = {}
        bufs: list[SharedBuffer] = []
        for i in range(batch):
            q = qs[i % len(qs)]
            if mode == "sva":
                src = q.alloc(len(src_data))
                src.view[:] = src_data
                probe = sess.request(src_data)
                dst = q.alloc(max(probe.dst_len, 64))
                bufs += (src, dst)
                req = sess.request(src, dst=dst)
            else:
                req = sess.request(src_data)
            per.setdefault(q.qid, (q, []))[1].append((req, i))
        # each queue keeps its share of the batch in flight on its own: a queue
        # whose requests are done is refilled at once (one doorbell), without
        # waiting for the other queues (UADK's async mode; no cross-engine barrier)
        groups = [
            (q, [(req, (g, i)) for req, i in reqs]) for g, (q, reqs) in enumerate(per.values())
        ]
        left = [0] * len(groups)
        since = [0.0] * len(groups)
        requests = 0
        lat_total = 0.0
        errors = 0
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        end = t0 + seconds

        def refill(g: int) -> None:
            q, reqs = groups[g]
            since[g] = time.perf_counter()
            q.submit_many(reqs, owner=sess)
            left[g] = len(reqs)

        for g in range(len(groups)):
            refill(g)
        while True:
            cs = sess.poll()
            if not cs:
                cs = [await sess.recv()]
            now = time.perf_counter()
            for c in cs:
                g = c.tag[0]
                left[g] -= 1
                errors += not c.ok
                if not left[g]:
                    n = len(groups[g][1])
                    requests += n
                    lat_total += (now - since[g]) * n
                    if now < end:
                        refill(g)
            if now >= end and not any(left):
                break
        wall = now - t0
        cpu = time.process_time() - cpu0
        for b in bufs:
            b.free()
    finally:
        await prov.aclose()
    return {
        "alg": alg,
        "op": op_.name.lower(),
        "length": size,
        "mode": mode,
        "batch": batch,
        "queues": len(qs),
        "seconds": round(wall, 3),
        "requests": requests,
        "errors": errors,
        "kib_s": round(requests * size / 1024 / wall, 1),
        "kops": round(requests / wall / 1000, 3),
        "cpu_pct": round(100 * cpu / wall, 1),
        "avg_lat_us": round(1e6 * lat_total / max(requests, 1) / 1, 1),
        "algorithm": int(a1),
    }


async def _prepare(qs: list[AccelQueue], spec: SessionSpec, data: bytes) -> bytes:
    """Input for decompress/decrypt benches: the data compressed/encrypted once."""
    fwd = "compress" if spec.resolved()[0] is Op.DECOMPRESS else "encrypt"
    s = Session(qs[:1], SessionSpec(spec.alg, op=fwd, level=spec.level, key=spec.key, iv=spec.iv))
    return bytes(await s.do(data))


def format_bench(r: dict[str, Any] | list[dict[str, Any]]) -> str:
    """UADK-style table of one or more bench results."""
    rows = r if isinstance(r, list) else [r]
    head = (
        f"{'alg':<16} {'length':>8} {'perf KiB/s':>14} {'iops Kops':>10}"
        f" {'CPU_rate %':>10} {'avg latency us':>15}"
    )
    out = [head]
    out += [
        f"{x['alg']:<16} {x['length']:>8} {x['kib_s']:>14.1f} {x['kops']:>10.3f}"
        f" {x['cpu_pct']:>10.1f} {x['avg_lat_us']:>15.1f}"
        for x in rows
    ]
    return "\n".join(out)


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """A request size: bytes, or a number with K, M or G (binary units, as the
    host's sizes and the shell's ``dd``): ``65536``, ``64K``, ``1M``, ``4KiB``.

    Raises:
        argparse.ArgumentTypeError: not such a size, or 0.
    """
    m = _SIZE_RE.match(text)
    if m is None or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise argparse.ArgumentTypeError(
            f"bad size {text!r}: expected bytes or a number with K, M or G, e.g. 64K"
        )
    n = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if n <= 0:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: must be at least 1 byte")
    return n


def bench_args(argv: list[str]) -> dict[str, Any]:
    """Parse ``--alg ALG --size N --seconds S [--batch B] [--mode sva|nosva] [--json]``.

    Raises:
        LocalProtocolError: bad arguments (message is argparse's).
    """

    class _P(argparse.ArgumentParser):
        def error(self, message: str) -> Any:
            raise LocalProtocolError(f"accel bench: {message}")

    p = _P(prog="accel bench", add_help=False)
    p.add_argument("--alg", required=True)
    p.add_argument("--size", type=parse_size, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mode", choices=("sva", "nosva"), default="sva")
    p.add_argument("--op", default=None)
    p.add_argument("--level", type=int, default=1)
    p.add_argument("--json", action="store_true")
    ns = p.parse_args(argv)
    return vars(ns)
