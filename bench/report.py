"""Render ``docs/performance.md`` from ``bench/results/*.json`` (run by ``make bench``).

Every table compares against a baseline measured in the same run; the page
is regenerated, never hand-edited, so the figures and the JSON cannot drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import datapath, report_latency, vhost_user
from bench.report_latency import met_cell
from bench.report_throughput import ab_sections, profile, scaling, scaling_targets

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "performance.md"
SUMMARY = RESULTS / "summary.json"
#: Issue 16's baseline ("today", measured on a quiet machine before its work):
#: block 4 KiB random QD32 IOPS; its goal until bench/vhost_user.py exists is 3x.
BLOCK_QD32_BASELINE_IOPS = {"randread": 24_900, "randwrite": 15_700}


def _load(name: str) -> dict[str, Any] | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def ring(r: dict[str, Any]) -> list[str]:
    out = [
        "## Ring core (`bench/ring.py`)",
        "",
        f"Measured {r['when']}, Python {r['python']}, queue size {r['queue_size']}, "
        f"{r['seconds']} s x {r['runs']} runs per cell (median). Each request: the driver "
        "copies the payload into a shared buffer and makes it available; the device takes it, "
        "copies it to device-local memory and returns it; the driver reaps it. `ceiling` is a "
        "bare struct ring with no checks; `mic-vop` is `DriverQueue`/`DeviceQueue` with every "
        "hostile-peer check; `packed` is the packed ring (`virtio.packed`) doing the same "
        "calls, measured in the same run; `pipe` is `multiprocessing.Pipe` request/response. "
        "`2proc`: device in a forked process on the other core, both busy-polling shared memory.",
        "",
        "| mode | payload | batch | ceiling req/s | mic-vop req/s | pipe req/s "
        "| vs ceiling | vs pipe | packed req/s | packed vs split |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        pipe = row["pipe_rps"]
        vs_pipe = row["ratio_vs_pipe"]
        pk = row.get("packed_rps")
        pk_cells = "- | -" if pk is None else f"{pk:,} | {row['ratio_packed_vs_split']:.2f}x"
        out.append(
            f"| {row['mode']} | {row['size']} B | {row['batch']} | {row['ceiling_rps']:,} | "
            f"{row['micvop_rps']:,} | {'-' if pipe is None else f'{pipe:,}'} | "
            f"{row['ratio_vs_ceiling']:.2f}x | {'-' if vs_pipe is None else f'{vs_pipe:.1f}x'} | "
            f"{pk_cells} |"
        )
    t = r["targets"]
    out += [
        "",
        f"Targets: >= {t['batch32_vs_ceiling']}x the ceiling at batch 32, "
        f">= {t['vs_pipe']}x the Pipe.",
        "",
    ]
    return out


def transport(t: dict[str, Any]) -> list[str]:
    out = [
        "## Transport (`bench/transport_bench.py`)",
        "",
        f"Measured {t['when']}. Doorbell round trip between two processes (µs, mean / p50 / "
        "p99); `split` = pinned to different cores, `same` = one core. Details and the DMA "
        "stall study: `docs/transport.md`.",
        "",
        "| placement | variant | mean µs | p50 µs | p99 µs |",
        "|---|---|---|---|---|",
    ]
    for placement, rows in t["doorbell"]["placements"].items():
        for variant, v in rows.items():
            out.append(
                f"| {placement} | {variant} | {v['mean_us']:.1f} | {v['p50_us']:.1f} | "
                f"{v['p99_us']:.1f} |"
            )
    out += ["", "DMA copy throughput, GB/s (same run: a plain memoryview copy):", ""]
    out += [
        "| size | memoryview | DMA (aligned) | DMA (unaligned, CPU path) |",
        "|---|---|---|---|",
    ]
    for size, v in t["dma"]["sizes"].items():
        n = int(size)
        label = f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
        out.append(
            f"| {label} | {v['memoryview']:.1f} | {v['dma']:.1f} | {v['dma_unaligned_cpu']:.1f} |"
        )
    out.append("")
    return out


def boot(b: dict[str, Any]) -> list[str]:
    return [
        "## Card boot and memory (`bench/boot.py`)",
        "",
        f"Measured {b['when']}: boot -> online of the default card (console + 64 MiB disk), "
        f"median of {b['reboots']} reboots, and memory of the daemon plus one card.",
        "",
        "| what | value | baseline (same run) | target |",
        "|---|---|---|---|",
        f"| boot -> online (client wall clock) | {b['boot_wall_s']['median'] * 1000:.0f} ms "
        f"(max {b['boot_wall_s']['max'] * 1000:.0f}) | `python -c 'import mic_card.card'` "
        f"{b['python_import_card_s'] * 1000:.0f} ms ({b['boot_vs_import_floor']:.2f}x) | "
        f"<= {b['targets']['boot_s'] * 1000:.0f} ms |",
        f"| host + card memory (PSS) | {b['total_pss_mib']:.1f} MiB (host "
        f"{b['host']['pss_mib']:.1f}, card {b['card']['pss_mib']:.1f}) | RSS summed "
        f"{b['total_rss_mib']:.1f} MiB (counts shared regions twice) | "
        f"<= {b['targets']['total_mib']} MiB |",
        "",
    ]


def block(b: dict[str, Any]) -> list[str]:
    out = [
        "## Block device (`bench/block.py`)",
        "",
        f"Measured {b['when']}: card-side I/O (a card app) on a {b['image_mib']} MiB image, "
        "against reading/writing the same image directly on the host in the same run. "
        "`zc`: zero-copy buffers in card RAM; `q`: virtqueues (MQ). Details: `docs/block.md`.",
        "",
        "| pattern | block | depth | queues | zero-copy | card MB/s | card IOPS | local MB/s "
        "| card / local |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    out.extend(
        f"| {r['pattern']} | {r['bs']} | {r['depth']} | {r['queues']} | "
        f"{'yes' if r['zero_copy'] else 'no'} | {r['card_mb_s']:.0f} | {r['card_iops']:,} | "
        f"{r['local_mb_s']:.0f} | {r['ratio']:.2f}x |"
        for r in b["rows"]
    )
    out += ["", f"Target: sequential reads >= {b['target']}x the local read.", ""]
    return out


def accel(a: dict[str, Any]) -> list[str]:
    out = [
        "## Accelerators (`bench/accel.py`)",
        "",
        "Engine workers (separate processes) against calling zlib / cryptography in-process "
        "in the same run; UADK columns. Details: `docs/accel.md`.",
        "",
        "| alg | length | batch | KiB/s | Kops | avg latency µs | in-process KiB/s | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out.extend(
        f"| {r['alg']} | {r['length']} | {r['batch']} | {r['kib_s']:,.0f} | {r['kops']:.2f} | "
        f"{r['avg_lat_us']:.0f} | {r['inproc']['kib_s']:,.0f} | {r['ratio']:.2f}x |"
        for r in a["rows"]
    )
    out += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    for name, t in a["targets"].items():
        runs = f" (median of {', '.join(map(str, t['runs']))})" if t.get("runs") else ""
        out.append(
            f"| {name} | {t['value']}{runs} | {t['target']} | {'yes' if t['met'] else 'no'} |"
        )
    out.append("")
    host = a.get("host_reach")
    if host:
        out.append(
            "Host reach (a host script's offload channels through a real daemon and card, "
            f"{host['alg']} on {host['length']} B, batch {host['batch']}): "
            + "; ".join(
                f"{r['channels']} channel(s) {r['kib_s']:,.0f} KiB/s = {r['ratio']:.2f}x in-process"
                for r in host["rows"]
            )
        )
        out.append("")
    return out


def net(n: dict[str, Any]) -> list[str]:
    v, r = n["veth"], n["relay"]
    out = [
        "## Network (`bench/net.py`)",
        "",
        f"Measured {n['when']}: iperf3 TCP, {n['seconds']:g} s per run, through the card's "
        "virtio-net NIC (`tap` backend: host TAP -> host backend -> rings -> card driver -> "
        "card TAP), against a veth pair between two namespaces and a minimal Python "
        "TAP-to-TAP relay (plain TAPs, no offloads) in the same run. Details: `docs/net.md`.",
        "",
        "| direction | virtio-net Gbit/s | veth Gbit/s | relay Gbit/s | vs veth | vs relay | met |",
        "|---|---|---|---|---|---|---|",
    ]
    out.extend(
        f"| {row['direction'].replace('_', ' ')} | {row['gbps']:.2f} | {row['veth_gbps']:.2f} | "
        f"{row['relay_gbps']:.2f} | {row['vs_veth']:.2f}x | {row['vs_relay']:.2f}x | "
        f"{'yes' if row['met'] else 'no'} |"
        for row in n["rows"]
    )
    out += [
        "",
        f"veth per direction: {v['a_to_b']:.2f} / {v['b_to_a']:.2f} Gbit/s; relay "
        f"{r['a_to_b']:.2f} / {r['b_to_a']:.2f} Gbit/s. Target: >= {n['target_vs_veth']}x "
        "veth and above the relay.",
        "",
    ]
    return out


def isolation(i: dict[str, Any]) -> list[str]:
    alone, nb = i["phases"][0], i["phases"][1]
    goals, met = i["goals"], i["met"]

    def yes(key: str) -> str:
        return "met" if met[key] else "**not met**"

    rows = (
        ("verified block ops", "ops", "{:,}"),
        ("block p50 ms", "block_p50_ms", "{:.3f}"),
        ("block p99 ms", "block_p99_ms", "{:.3f}"),
        ("console echo p99 ms", "console_p99_ms", "{:.3f}"),
        ("missed heartbeats", "missed_heartbeats", "{}"),
        ("daemon RSS growth MiB", "rss_growth_mib", "{:.1f}"),
        ("healthy card reboot s", "reboot_s", "{:.3f}"),
    )
    out = [
        "## Isolation (`bench/isolation.py`)",
        "",
        f"Measured {i['when']}, {i['seconds']:g} s per phase, seed {i['seed']}: a healthy card "
        "doing verified block I/O and console echoes, alone and then next to a hostile card "
        f"(nice {i['hostile_nice']}) playing {', '.join(i['attacks'])} (issue 14).",
        "",
        "| healthy card | alone | with the hostile neighbour |",
        "|---|---|---|",
    ]
    out.extend(
        f"| {label} | {fmt.format(alone[key])} | {fmt.format(nb[key])} |"
        for label, key, fmt in rows
    )
    out += [
        "",
        f"Goals: missed heartbeats == {goals['missed_heartbeats']} ({yes('missed_heartbeats')}); "
        f"block p99 <= {goals['p99_ratio']:g}x alone: {i['block_p99_ratio']:.2f}x "
        f"({yes('p99_ratio')}); daemon RSS growth <= {goals['rss_growth_mib']} MiB "
        f"({yes('rss_growth_mib')}); no healthy-card error ({yes('no_errors')}).",
        "",
    ]
    before = _load("isolation_before")
    if before is not None:
        b_alone, b_nb = before["phases"][0], before["phases"][1]
        out += [
            f"Before the latency work (issue 19; {before['when']}, {before['seconds']:g} s per "
            f"phase, same window): block p99 {b_alone['block_p99_ms']:.3f} ms alone, "
            f"{b_nb['block_p99_ms']:.3f} ms with the neighbour = "
            f"{before['block_p99_ratio']:.2f}x; console echo p99 "
            f"{b_alone['console_p99_ms']:.3f} / {b_nb['console_p99_ms']:.3f} ms; missed "
            f"heartbeats {b_nb['missed_heartbeats']}.",
            "",
        ]
    return out


# -- the summary: every target of every bench, measured, goal, met ---------------------


def _row(bench: str, target: str, measured: str, goal: str, met: bool | None) -> dict[str, Any]:
    return {"bench": bench, "target": target, "measured": measured, "goal": goal, "met": met}


def _ring_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    t = r["targets"]
    out = []
    for row in r["rows"]:
        if row["mode"] != "2proc" or row["batch"] != 32:
            continue
        out.append(
            _row("ring", f"2 processes, batch 32, {row['size']} B vs bare struct ring",
                 f"{row['ratio_vs_ceiling']:.2f}x", f">= {t['batch32_vs_ceiling']}x",
                 row["ratio_vs_ceiling"] >= t["batch32_vs_ceiling"])
        )  # fmt: skip
        if row["ratio_vs_pipe"] is not None:
            out.append(
                _row("ring", f"2 processes, batch 32, {row['size']} B vs multiprocessing.Pipe",
                     f"{row['ratio_vs_pipe']:.2f}x", f">= {t['vs_pipe']}x",
                     row["ratio_vs_pipe"] >= t["vs_pipe"])
            )  # fmt: skip
    return out


def _boot_targets(b: dict[str, Any]) -> list[dict[str, Any]]:
    t = b["targets"]
    wall = b["boot_wall_s"]["median"]
    return [
        _row("boot", "boot -> online", f"{wall * 1000:.0f} ms", f"<= {t['boot_s'] * 1000:.0f} ms",
             wall <= t["boot_s"]),
        _row("boot", "host + card memory (PSS)", f"{b['total_pss_mib']:.1f} MiB",
             f"<= {t['total_mib']} MiB", b["total_pss_mib"] <= t["total_mib"]),
    ]  # fmt: skip


def _block_targets(b: dict[str, Any]) -> list[dict[str, Any]]:
    goal = b["target"]["seqread_vs_local"]
    best = b["ratios"]["seqread_vs_local_best"]
    out = [
        _row("block", "1 MiB sequential read QD8 vs local read", f"{best:.2f}x", f">= {goal}x",
             best >= goal)
    ]  # fmt: skip
    for pattern, base in BLOCK_QD32_BASELINE_IOPS.items():
        rows = [r for r in b["rows"] if r["pattern"] == pattern and r["zero_copy"]]
        if not rows:
            continue
        iops = max(r["card_iops"] for r in rows)
        out.append(
            _row("block", f"4 KiB {pattern} QD32 IOPS (issue 16: 3x its baseline {base:,})",
                 f"{iops:,} ({iops / base:.2f}x)", f">= {3 * base:,}", iops >= 3 * base)
        )  # fmt: skip
    return out


def _accel_targets(a: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        _row("accel", name, str(t["value"]), str(t["target"]), bool(t["met"]))
        for name, t in a["targets"].items()
    ]


def _net_targets(n: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        _row("net", f"iperf3 {row['direction'].replace('_', ' ')} vs veth (and above the relay)",
             f"{row['vs_veth']:.2f}x veth, {row['vs_relay']:.2f}x relay",
             f">= {n['target_vs_veth']}x veth, > 1x relay", bool(row["met"]))
        for row in n["rows"]
    ]  # fmt: skip


def _isolation_targets(i: dict[str, Any]) -> list[dict[str, Any]]:
    goals, met = i["goals"], i["met"]
    nb = i["phases"][1]
    return [
        _row("isolation", "healthy block p99 next to a hostile card vs alone",
             f"{i['block_p99_ratio']:.2f}x", f"<= {goals['p99_ratio']:g}x", met["p99_ratio"]),
        _row("isolation", "missed heartbeats", str(nb["missed_heartbeats"]),
             f"== {goals['missed_heartbeats']}", met["missed_heartbeats"]),
        _row("isolation", "daemon RSS growth", f"{nb['rss_growth_mib']:.1f} MiB",
             f"<= {goals['rss_growth_mib']} MiB", met["rss_growth_mib"]),
        _row("isolation", "no healthy-card error", "none" if met["no_errors"] else "errors",
             "none", met["no_errors"]),
    ]  # fmt: skip


SUMMARIES = (
    ("ring", _ring_targets),
    ("boot", _boot_targets),
    ("block", _block_targets),
    ("accel", _accel_targets),
    ("net", _net_targets),
    ("isolation", _isolation_targets),
    ("latency", report_latency.targets),
    ("vhost_user", vhost_user.targets),
    ("scaling", scaling_targets),
    ("datapath", datapath.targets),
)


def summary() -> list[dict[str, Any]]:
    """One row per target of every bench whose results exist."""
    rows: list[dict[str, Any]] = []
    for name, fn in SUMMARIES:
        data = _load(name)
        if data is None:
            rows.append(_row(name, "(all)", f"no bench/results/{name}.json", "-", None))
        else:
            rows.extend(fn(data))
    return rows


def summary_md(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "## Summary: every target",
        "",
        "Also in `bench/results/summary.json`; `make bench` ends by printing it.",
        "",
        "| bench | target | measured | goal | met |",
        "|---|---|---|---|---|",
    ]
    out.extend(
        f"| {r['bench']} | {r['target']} | {r['measured']} | {r['goal']} | {met_cell(r['met'])} |"
        for r in rows
    )
    out.append("")
    return out


def summary_text(rows: list[dict[str, Any]]) -> str:
    cols = ("bench", "target", "measured", "goal", "met")
    cells = [[r[c] if c != "met" else met_cell(r[c]).strip("*") for c in cols] for r in rows]
    widths = [max(len(c), *(len(str(x[i])) for x in cells)) for i, c in enumerate(cols)]
    line = "  ".join(f"{c:<{w}}" for c, w in zip(cols, widths, strict=True))
    body = ["  ".join(f"{x!s:<{w}}" for x, w in zip(row, widths, strict=True)) for row in cells]
    met = sum(1 for r in rows if r["met"])
    judged = sum(1 for r in rows if r["met"] is not None)
    return "\n".join([line, "-" * len(line), *body, f"{met} of {judged} targets met", ""])


def main() -> int:
    lines = [
        "# Performance",
        "",
        "Generated by `python -m bench.report` from `bench/results/*.json` (`make bench` runs "
        "the benchmarks and this). Machine: the project's 2-vCPU KVM guest; every figure is "
        "compared with a baseline measured in the same run, so ratios are the numbers to "
        "read. Absolute figures move with the machine's load (other processes share both "
        "cores).",
        "",
    ]
    intro = len(lines)
    sections = (
        ("ring", ring),
        ("transport", transport),
        ("boot", boot),
        ("block", block),
        ("accel", accel),
        ("net", net),
        ("isolation", isolation),
        ("latency", lambda lat: report_latency.section(lat, _load)),
        ("vhost_user", vhost_user.section),
        ("datapath", datapath.section),
        ("profile", profile),
        ("profile_before", profile),
        ("scaling", scaling),
        ("scaling_before", scaling),
    )
    for name, fn in sections:
        data = _load(name)
        if data is None:
            lines += [f"## {name}", "", f"(no `bench/results/{name}.json` yet)", ""]
        else:
            lines += fn(data)
    lines += ab_sections(RESULTS)
    rows = summary()
    lines[intro:intro] = summary_md(rows)
    OUT.write_text("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(json.dumps({"targets": rows}, indent=1) + "\n")
    print(f"wrote {OUT} and {SUMMARY}")
    print()
    print(summary_text(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
