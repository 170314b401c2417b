"""The issue-16 sections of ``docs/performance.md``: where the time goes, scaling, A/B.

Rendered by :mod:`bench.report` from ``bench/results/profile.json``
(``bench/profile.py``), ``scaling.json`` (``bench/scaling.py``) and every
``ab-*.json`` (``bench/ab.py``). Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["ab_sections", "profile", "scaling", "scaling_targets"]

#: Functions shown per process in the breakdown table.
TOP = 10


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def profile(p: dict[str, Any]) -> list[str]:
    label = f": {p['label']}" if p.get("label") else ""
    out = [
        f"## Where the time goes{label} (`bench/profile.py`)",
        "",
        f"Measured {p['when']} (load average {p['load']:.1f}), py-spy at {p['rate']} Hz on the "
        "daemon and the card for the whole workload, CPU time from `/proc/PID/stat` over the "
        "same window. `µs/req` = the process's CPU per request times the function's share of "
        "its non-idle samples (*self* time: the frame that was running). py-spy samples a "
        "thread that is runnable but preempted as well, so the share of the call that wakes "
        "the peer (`Doorbell.ring`, an `eventfd` write) includes the time the woken process "
        "held the CPU. How to read it and what was done about it: `docs/throughput.md`.",
        "",
    ]
    for name, r in p["runs"].items():
        if "skipped" in r:
            out += [f"**{name}**: skipped ({r['skipped']})", ""]
            continue
        extra = f", {r['gbps']} Gbit/s" if "gbps" in r else ""
        procs = r["processes"]
        out += [
            f"**{r['workload']}**: {r['rate']:,} requests/s{extra}; CPU per request "
            + ", ".join(
                f"{who} {pr['us_per_request']} µs ({pr['cpu_pct']}% of a CPU)"
                for who, pr in procs.items()
            )
            + f", total {r['us_per_request']} µs.",
            "",
            "| " + " | ".join(f"{who} (self) | µs/req | share" for who in procs) + " |",
            "|" + "---|---|---|" * len(procs),
        ]
        tops = [pr["top_self"][:TOP] for pr in procs.values()]
        for i in range(max(len(t) for t in tops)):
            cells = []
            for t in tops:
                if i < len(t):
                    row = t[i]
                    cells.append(f"`{row['function']}` | {row['us']:.2f} | {_pct(row['share'])}")
                else:
                    cells.append(" | | ")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def scaling(s: dict[str, Any]) -> list[str]:
    env = ", ".join(f"{k}={v}" for k, v in s["env"].items()) or "default loop"
    load = s["load"][0]
    label = f": {s['label']}" if s.get("label") else ""
    out = [
        f"## Cost as work grows{label} (`bench/scaling.py`)",
        "",
        f"Measured {s['when']} (load average {load:.1f}; {env}): one daemon, {s['cards']} "
        f"cards each with its own block device; {s['workload']}, {s['seconds']:g} s per phase, "
        f"{s['runs']} runs alternating (median). CPU = the daemon plus every card process "
        "(idle ones included) over the phase.",
        "",
        "| phase | aggregate IOPS | CPU µs per request | CPU used |",
        "|---|---|---|---|",
    ]
    for key, label in (("one", "one card busy"), ("all", f"{s['cards']} cards busy")):
        rs = s[key]
        mid = sorted(rs, key=lambda r: r["cpu_us_per_request"])[len(rs) // 2]
        out.append(
            f"| {label} | {s[key + '_iops']:,.0f} | {s[key + '_cpu_us']:.1f} | "
            f"{mid['cpu_pct']:.0f}% of a CPU |"
        )
    met = "met" if s["met"] else "**not met**"
    out += [
        "",
        f"CPU per request with {s['cards']} cards busy / one card: **{s['cpu_ratio']:.2f}x** "
        f"(goal <= {s['goal']}x, {met}).",
        "",
    ]
    return out


def scaling_targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "bench": "scaling",
            "target": f"CPU per block request, {s['cards']} cards busy vs one "
            f"(aggregate {s['all_iops']:,.0f} IOPS)",
            "measured": f"{s['cpu_ratio']:.2f}x",
            "goal": f"<= {s['goal']}x",
            "met": bool(s["met"]),
        }
    ]


def _cell(r: dict[str, Any], v: str) -> str:
    fmt = "{:,.2f}" if r["unit"] == "Gbit/s" else "{:,.0f}"
    runs = " / ".join(fmt.format(x) for x in r[v])
    return f"{fmt.format(r[v + '_median'])} ({runs})"


def ab_sections(results: Path) -> list[str]:
    files = sorted(results.glob("ab-*.json"))
    if not files:
        return []
    out = [
        "## A/B, interleaved (`bench/ab.py`)",
        "",
        "Each cell alternates the two variants in fresh processes in the same minutes "
        "(`--rounds` times, the first variant alternating), so both see the same load; the "
        "median and every run are shown, with the CPU time (daemon + card) per request (block) "
        "or per MB (net). Rerun any of them with the command in its heading. What each lever "
        "is and why it was kept or not: `docs/throughput.md`.",
        "",
    ]
    for f in files:
        ab = json.loads(f.read_text())
        a, b = ab["a"], ab["b"]

        def desc(v: dict[str, Any]) -> str:
            env = " ".join(f"{k}={x}" for k, x in v["env"].items())
            return f"{v['name']} ({v['commit']}{', ' + env if env else ''})"

        loads = ", ".join(f"{x:.1f}" for x in ab["load"])
        out += [
            f"### {ab['label']}: {desc(a)} vs {desc(b)}",
            "",
            f"Measured {ab['when']}, {ab['rounds']} rounds of {ab['seconds']:g} s, load average "
            f"at each round {loads}. {ab['note']}".rstrip(),
            "",
            f"| cell | {a['name']} | {b['name']} | ratio | CPU {a['name']} | CPU {b['name']} "
            "| CPU ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in ab["rows"]:
            ca = sorted(r["a_cpu"])[len(r["a_cpu"]) // 2]
            cb = sorted(r["b_cpu"])[len(r["b_cpu"]) // 2]
            out.append(
                f"| {r['cell']} ({r['unit']}) | {_cell(r, 'a')} | {_cell(r, 'b')} | "
                f"{r['ratio']:.2f}x | {ca:,.1f} | {cb:,.1f} {r['cpu_unit']} | "
                f"{r['cpu_ratio']:.2f}x |"
            )
        out.append("")
    return out
