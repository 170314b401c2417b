"""Card boot time and memory: how long ``boot`` takes to reach ``online``, and
what the host daemon plus one card cost in memory.

Measured in one run against baselines on the same machine:

- ``python -c pass`` start-up (the floor any card OS process pays) and
  ``python -c "import mic_card.card"`` (the floor with our imports);
- boot → online of the default card (console + 64 MiB disk), as seen by a
  client (wall clock) and by the daemon (``boot_seconds``), over N reboots;
- memory of the daemon and the card process: RSS and PSS (``smaps_rollup``).
  PSS is the honest total: both processes map the same memfd regions, so
  adding their RSS counts shared pages twice.

Targets (issue "host daemon and card OS"): boot ≤ 0.5 s, host + card ≤ 100 MiB.
Run: ``python -m bench.boot [--quick]``; writes ``bench/results/boot.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mic_host

RESULTS = Path(__file__).with_name("results") / "boot.json"


def _kib(pid: int, field: str, path: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(pid: int) -> dict[str, float]:
    return {
        "rss_mib": _kib(pid, "VmRSS", "status") / 1024,
        "pss_mib": _kib(pid, "Pss", "smaps_rollup") / 1024,
    }


def startup(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def measure(reboots: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="micb", dir="/tmp") as d:
        async with mic_host.launch(state_dir=d) as client:
            card = client.card("mic0")
            await card.wait("online", timeout=30)
            wall: list[float] = []
            daemon_side: list[float] = []
            for _ in range(reboots):
                await card.shutdown(wait=True)
                t0 = time.perf_counter()
                await card.boot(wait=True)
                wall.append(time.perf_counter() - t0)
                st = await card.status()
                daemon_side.append(float(st["boot_seconds"]))
            st = await card.status()
            ping = await client.ping()
            host_pid, card_pid = int(ping["pid"]), int(st["pid"])
            host, cardm = memory(host_pid), memory(card_pid)
    return {
        "reboots": reboots,
        "boot_wall_s": {"median": statistics.median(wall), "max": max(wall)},
        "boot_daemon_s": {"median": statistics.median(daemon_side), "max": max(daemon_side)},
        "host": host,
        "card": cardm,
        "total_pss_mib": host["pss_mib"] + cardm["pss_mib"],
        "total_rss_mib": host["rss_mib"] + cardm["rss_mib"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    runs = 3 if args.quick else 7
    bare = startup([sys.executable, "-c", "pass"], runs)
    imports = startup([sys.executable, "-c", "import mic_card.card"], runs)
    res = asyncio.run(measure(3 if args.quick else 10))
    res |= {
        "python_startup_s": bare,
        "python_import_card_s": imports,
        "boot_vs_import_floor": res["boot_wall_s"]["median"] / imports,
        "targets": {"boot_s": 0.5, "total_mib": 100},
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": sys.version.split()[0],
    }
    print(f"python -c pass:                 {bare * 1000:7.1f} ms")
    print(f"python -c 'import mic_card.card': {imports * 1000:5.1f} ms  (floor for a card OS)")
    print(
        f"boot -> online (client, median of {res['reboots']}): "
        f"{res['boot_wall_s']['median'] * 1000:.1f} ms (max {res['boot_wall_s']['max'] * 1000:.1f})"
        f"  = {res['boot_vs_import_floor']:.2f}x the import floor; target 500 ms"
    )
    print(f"boot -> online (daemon side):  {res['boot_daemon_s']['median'] * 1000:.1f} ms")
    host, card = res["host"]["pss_mib"], res["card"]["pss_mib"]
    print(
        f"memory: host PSS {host:.1f} MiB, card PSS {card:.1f} MiB, total "
        f"{res['total_pss_mib']:.1f} MiB PSS ({res['total_rss_mib']:.1f} MiB RSS summed); "
        "target 100 MiB"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
