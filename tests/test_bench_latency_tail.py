"""``bench.latency``'s tail tools: which hop grows in the slowest 1%, and the
page-cache floor of the block read row."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench import latency, tails
from virtio import trace


def _episode(t: int, wake_ns: int) -> list[tuple[int, int]]:
    return [
        (trace.SUBMIT, t),
        (trace.DOORBELL, t + 5_000),
        (trace.HOST_WAKE, t + 5_000 + wake_ns),
        (trace.POP, t + 15_000 + wake_ns),
        (trace.PUSH, t + 25_000 + wake_ns),
        (trace.INTERRUPT, t + 30_000 + wake_ns),
        (trace.CARD_IRQ, t + 50_000 + wake_ns),
        (trace.COMPLETE, t + 55_000 + wake_ns),
    ]


def test_tail_breakdown_blames_the_step_that_grew() -> None:
    marks: list[tuple[int, int]] = []
    for i in range(300):
        # two slow requests: the daemon slept (doorbell -> host_wake 400 µs)
        marks += _episode(i * 1_000_000, 400_000 if i in (100, 200) else 10_000)
    t = tails.tail_breakdown(marks, trace.SUBMIT)
    assert t["episodes"] == 299  # the last one may be incomplete: left out
    assert t["slow"] == 3  # the 1% at or above the 0.99 quantile
    top = t["steps"][0]
    assert top["step"] == "doorbell -> host_wake"
    assert top["blamed"] == 2
    assert top["p50_us"] == 10.0
    assert top["slow_p50_us"] == 400.0


def test_tail_breakdown_needs_enough_episodes() -> None:
    marks = [m for i in range(10) for m in _episode(i * 1_000_000, 10_000)]
    assert tails.tail_breakdown(marks, trace.SUBMIT) == {"episodes": 9}


def test_preadv_floor_reads_the_image(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(b"\x5a" * (1 << 20))
    lat = tails.preadv_floor(img, 100)
    assert len(lat) == 100
    assert all(ns > 0 for ns in lat)


def test_the_floor_row_reports_its_own_tail(tmp_path: Path) -> None:
    # The machine's yardstick for the p99 goals: the floor's own p99 / p50.
    out = tmp_path / "latency.json"
    assert latency.main(["--quick", "--rows", "floor", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    floor = data["rows"][0]
    assert floor["p99_vs_p50"] == round(floor["p99_us"] / floor["p50_us"], 2)
    assert data["floor_p99_vs_p50"] == floor["p99_vs_p50"]


def test_neighbours_name_what_other_tasks_ran(tmp_path: Path) -> None:
    # A child that burns 30 ms of CPU (its own clock: load cannot shorten it),
    # then waits: between two snapshots it is a neighbour that ran >= 30 ms.
    burn = (
        "import sys, time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.03: pass\n"
        "print('done', flush=True)\n"
        "sys.stdin.read()\n"
    )
    before = tails.tasks_cpu()
    t0 = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"done\n"
            after = tails.tasks_cpu()
            dt = time.monotonic() - t0
        finally:
            child.kill()
    assert after[(child.pid, child.pid)][1] >= 30_000_000
    with_child = tails.neighbours(before, after, set(), dt, top=100)
    without = tails.neighbours(before, after, {child.pid}, dt, top=100)
    assert with_child["others_cpu_pct"] - without["others_cpu_pct"] >= 100 * 0.03 / dt - 0.02
    assert any(ns >= 30_000 for _, ns in with_child["top"])
