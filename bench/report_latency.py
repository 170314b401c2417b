"""The latency section of ``docs/performance.md`` and its summary rows (issue 19).

Rendered by :mod:`bench.report` from ``bench/results/latency.json``
(``bench/latency.py``) and the before/trace files next to it. Standard
library only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["met_cell", "section", "targets"]


def _target(target: str, measured: str, goal: str, met: bool | None) -> dict[str, Any]:
    return {"bench": "latency", "target": target, "measured": measured, "goal": goal, "met": met}


def met_cell(v: bool | None) -> str:
    """A target's ``met`` as a table cell (also :mod:`bench.report`'s summary)."""
    return "-" if v is None else ("yes" if v else "**no**")


def _trace_table(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str]:
    """Per-hop medians of one row, before and after, step by step."""
    steps: dict[str, list[str]] = {}
    for col, t in ((0, before), (1, after)):
        for s in (t or {}).get("steps", []):
            cell = f"{s['p50_us']:.1f}" + (
                f" (x{s['per_episode']:g})" if s["per_episode"] != 1 else ""
            )
            steps.setdefault(s["step"], ["-", "-"])[col] = cell
    out = ["| step | before µs | after µs |", "|---|---|---|"]
    out.extend(f"| {k} | {v[0]} | {v[1]} |" for k, v in steps.items())

    def total(t: dict[str, Any] | None) -> str:
        return "-" if not t or t.get("episode_p50_us") is None else f"{t['episode_p50_us']:.1f}"

    out.append(f"| **whole episode (median)** | {total(before)} | {total(after)} |")
    return out


def section(lat: dict[str, Any], load: Callable[[str], dict[str, Any] | None]) -> list[str]:
    """The latency section; ``load(name)`` reads ``bench/results/<name>.json`` (None if absent)."""
    before = load("latency_before")
    out = [
        "## Latency, one request at a time (`bench/latency.py`)",
        "",
        f"Measured {lat['when']} ({lat['code']}; load average {lat['loadavg'][0]:.2f}), "
        f"{lat['n']} requests per run, median of {lat['runs']} runs. The floor is two asyncio "
        "processes ping-ponging over eventfds with `add_reader` and no spin, measured in the "
        "same run (before, between and after the rows); `ratio` = p50 / floor p50. Block: a "
        "card app, 4 KiB random at queue depth 1 into a DMA buffer; console: a byte typed on "
        "the host pty until its echo (`pty echo, no card`: the same client over a bare pty, "
        "the kernel's share); net: ICMP echo from the card's namespace to the host "
        "address through the card's NIC (a raw-socket pinger, back to back; `10 ms apart` is "
        "`ping -i 0.01`). Goals (issue 19): block and console p50 <= 2x the floor, net "
        "<= 3x, every p99 <= 2x its p50, idle < 1% of a CPU each. How, why and what each "
        "change was worth: `docs/latency.md`.",
        "",
    ]
    if before is not None:
        out += [
            f"Before: {before['when']} ({before['code']}; load {before['loadavg'][0]:.2f}), "
            "the same bench against the code before this work, in the same window.",
            "",
            "| row | before p50 µs | before p99 µs | before ratio | after p50 µs "
            "| after p99 µs | after ratio | goal | met |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        old = {r["key"]: r for r in before["rows"]}
        for r in lat["rows"]:
            b = old.get(r["key"])
            bcells = (
                f"{b['p50_us']:.1f} | {b['p99_us']:.1f} | {b['ratio']:.2f}x" if b else "- | - | -"
            )
            goal = "-" if r["goal"] is None else f"<= {r['goal']:g}x"
            out.append(
                f"| {r['label']} | {bcells} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | "
                f"{r['ratio']:.2f}x | {goal} | {met_cell(r['met'])} |"
            )
    else:
        out += ["| row | p50 µs | p99 µs | ratio | goal | met |", "|---|---|---|---|---|---|"]
        for r in lat["rows"]:
            goal = "-" if r["goal"] is None else f"<= {r['goal']:g}x"
            out.append(
                f"| {r['label']} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['ratio']:.2f}x | "
                f"{goal} | {met_cell(r['met'])} |"
            )
    out.append("")
    idle = lat.get("idle")
    if idle:
        bi = (before or {}).get("idle") or {}
        was = f" (before: daemon {bi['daemon_pct']:.2f}%, card {bi['card_pct']:.2f}%)" if bi else ""
        out += [
            f"Idle, a card online and nothing to do for {idle['seconds']:g} s (`/proc/PID/stat`): "
            f"daemon {idle['daemon_pct']:.2f}%, card {idle['card_pct']:.2f}% of a CPU{was}.",
            "",
        ]
    nc = lat.get("net_cost")
    if nc:
        out += [
            f"Net ping, per ping: the daemon {nc['daemon_cpu_us']:.0f} µs of CPU and "
            f"{nc['daemon_wakeups']:.2f} wake-ups, the card {nc['card_cpu_us']:.0f} µs and "
            f"{nc['card_wakeups']:.2f} (`/proc/PID/task/*/schedstat`, voluntary context "
            "switches; far less load-dependent than the latency).",
            "",
        ]
    if lat.get("floor_p99_vs_p50") is not None:
        out += [
            f"The floor's own p99 is {lat['floor_p99_vs_p50']:.2f}x its p50 in this run: "
            "the machine's yardstick for the p99 goals (one wake-up on each side, nothing "
            "of ours in it).",
            "",
        ]
    for k, c in (lat.get("block_cost") or {}).items():
        near = ((lat.get("block_neighbours") or {}).get(k) or [{}])[0].get("top", [])
        out += [
            f"Block {k}, per request: the daemon {c['daemon_cpu_us']:.0f} µs of CPU and "
            f"{c['daemon_wakeups']:.3f} wake-ups, the card {c['card_cpu_us']:.0f} µs and "
            f"{c['card_wakeups']:.3f}; the card's loop slept in "
            f"{100 * c.get('card_loop_sleeps', 0):.1f}% of the requests (a request in which "
            "either side slept pays a full wake-up: above ~1%, the p99 holds one); the "
            f"machine's other tasks ran {c.get('others_cpu_pct', 0):.1f}% of a CPU meanwhile "
            f"({', '.join(n for n, _ in near) or '-'} the most).",
            "",
        ]
    for key, why in lat.get("skipped", {}).items():
        out += [f"`{key}` rows skipped: {why}.", ""]
    ab = load("throughput_ab")
    if ab:
        out += [
            "### Issue 16's throughput targets, before and after (no trade)",
            "",
            f"{ab['note']}",
            "",
            "| figure | before | after | goal |",
            "|---|---|---|---|",
        ]
        out.extend(
            f"| {r['figure']} | {r['before']} | {r['after']} | {r['goal']} |" for r in ab["rows"]
        )
        out.append("")
    tb = load("latency_trace_before") or {}
    tb_trace = tb.get("trace", {})
    ta = lat.get("trace", {})
    if ta or tb_trace:
        out += [
            "### Where one request's time goes (`MIC_TRACE`, `bench/latency.py --trace`)",
            "",
            "Median time of each step between consecutive hops, merged from the daemon's and "
            "the card's marks (`virtio/trace.py`; x N: the step happens N times per request). "
            f"Before: {tb.get('code', '-')}; after: {lat['code']}.",
            "",
        ]
        for what in ("block", "console", "net"):
            if what in ta or what in tb_trace:
                out += [f"**{what}**", ""]
                out += _trace_table(tb_trace.get(what), ta.get(what))
                out.append("")
    return out


def targets(lat: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    tail = lat["goals"]["p99_vs_p50"]
    for r in lat["rows"]:
        if r["goal"] is None:
            continue
        out.append(
            _target(f"{r['label']}: p50 vs floor", f"{r['ratio']:.2f}x "
                 f"({r['p50_us']:.0f} µs)", f"<= {r['goal']:g}x", r["ratio"] <= r["goal"])
        )  # fmt: skip
        out.append(
            _target(f"{r['label']}: p99 vs its p50", f"{r['p99_vs_p50']:.2f}x",
                 f"<= {tail:g}x", r["p99_vs_p50"] <= tail)
        )  # fmt: skip
    for key, why in lat.get("skipped", {}).items():
        out.append(_target(f"{key} rows", f"skipped: {why}", "-", None))
    idle = lat.get("idle")
    if idle:
        for who in ("daemon", "card"):
            v = idle[f"{who}_pct"]
            goal = lat["goals"]["idle_cpu_pct"]
            out.append(
                _target(f"idle CPU of the {who} (a card online, nothing to do)",
                     f"{v:.2f}%", f"< {goal:g}%", v < goal)
            )  # fmt: skip
    return out
