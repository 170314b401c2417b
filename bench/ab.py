"""A/B on a shared machine: two trees (or two settings), interleaved, same minutes.

Runs every cell for variant A, then for variant B, then A again... ``--rounds``
times, so both see the same load; reports the median of each and the ratio
A / B, with the load average of each round. A cell runs in a fresh Python
process whose working directory is the variant's tree, so it imports *that*
tree's ``mic_host``/``mic_card`` (its daemon and cards too): B can be a second
checkout of ``main`` (``git worktree add ../base main``).

Cells (each starts its own daemon and card):

- ``block-read-32`` / ``block-write-32``: 4 KiB random, queue depth 32, one
  queue, zero-copy (``bench.block:card_io``); ``-1`` is queue depth 1;
  rate = IOPS;
- ``net-h2c`` / ``net-c2h``: iperf3 TCP host -> card / card -> host through the
  card's NIC (``tap`` backend, as ``bench/net.py``); rate = Gbit/s; needs root.

For every cell, ``cpu_us`` is the CPU time (user + system, ``/proc/PID/stat``)
of the daemon plus the card per request (block) or per MB moved (net).

Run: ``python -m bench.ab --b-tree ../base --label levers`` (A = this tree),
``python -m bench.ab --a-env MIC_EVENT_LOOP=uvloop --label uvloop`` (both this
tree, A on uvloop). Writes ``bench/results/ab-LABEL.json``; ``bench/report.py``
renders every such file into ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("results")
CELLS = ("block-read-32", "block-write-32", "block-read-1", "block-write-1", "net-h2c", "net-c2h")

#: One cell, run with ``python -c CELL ARGS_JSON`` in the variant's tree: only what
#: every tree has (``mic_host.launch``, ``bench.block``, ``bench.net``).
CELL = r"""
import asyncio, json, os, shutil, sys, tempfile, uuid
from pathlib import Path

args = json.loads(sys.argv[1])
CFG = '''
[[cards]]
name = "mic0"
boot_at_start = true
card_ram = "128M"
heartbeat_timeout = 30.0

[[cards.devices]]
type = "block"
options = {{ image = "{image}" }}
'''


def cpu(pids):
    t = 0
    for pid in pids:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        t += int(f[11]) + int(f[12])
    return t / os.sysconf("SC_CLK_TCK")


async def block(pattern, qd, secs, env):
    import mic_host
    from bench.block import make_image

    tmp = Path(tempfile.mkdtemp(prefix="miab", dir="/tmp"))
    try:
        image = tmp / "b.img"
        make_image(image, 64 << 20)
        async with mic_host.launch(tmp / "s", CFG.format(image=image), env=env) as client:
            card = client.card("mic0")
            await card.wait("online", timeout=60)
            pids = [int((await client.ping())["pid"]), int((await card.status())["pid"])]
            await card.run("bench.block:card_io", "vda", pattern, 4096, qd, 0.2, True)
            c0 = cpu(pids)
            r = (await card.run("bench.block:card_io", "vda", pattern, 4096, qd, secs, True))
            r = r["value"]
            return {"rate": r["ops"] / r["seconds"], "cpu_us": (cpu(pids) - c0) / r["ops"] * 1e6}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def net(direction, secs, env):
    from bench.net import card_net, iperf, namespaces

    hns, cns = f"mvah-{uuid.uuid4().hex[:5]}", f"mvac-{uuid.uuid4().hex[:5]}"
    state = Path(tempfile.mkdtemp(prefix="miab", dir="/tmp"))
    try:
        with namespaces(hns):
            async with card_net(state, hns, cns, env=env) as card:
                client = card.client
                pids = [int((await client.ping())["pid"]), int((await card.status())["pid"])]
                c0 = cpu(pids)
                if direction == "h2c":
                    g = await iperf(cns, hns, "172.31.1.1", secs)
                else:
                    g = await iperf(hns, cns, "172.31.1.254", secs)
                mb = g * 1e9 / 8 * secs / 1e6
                return {"rate": g, "cpu_us": (cpu(pids) - c0) / mb * 1e6}
    finally:
        shutil.rmtree(state, ignore_errors=True)


kind, _, rest = args["cell"].partition("-")
if kind == "block":
    pattern, qd = rest.split("-")
    coro = block("rand" + pattern, int(qd), args["seconds"], args["env"])
else:
    coro = net(rest, args["seconds"], args["env"])
print("RESULT " + json.dumps(asyncio.run(coro)), flush=True)
"""


def _env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep:
            raise SystemExit(f"--a-env/--b-env take KEY=VALUE, not {p!r}")
        out[k] = v
    return out


def _commit(tree: Path) -> str:
    r = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return r.stdout.strip() or "?"


def run_cell(tree: Path, cell: str, seconds: float, env: dict[str, str]) -> dict[str, float]:
    """One cell in a fresh process in ``tree``; its result (``rate``, ``cpu_us``)."""
    args = json.dumps({"cell": cell, "seconds": seconds, "env": env})
    child_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", CELL, args],
        cwd=tree,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            res: dict[str, float] = json.loads(line[7:])
            return res
    raise RuntimeError(f"cell {cell} in {tree} failed ({r.returncode}):\n{r.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    p.add_argument("--label", required=True, help="names bench/results/ab-LABEL.json")
    p.add_argument("--a-tree", type=Path, default=ROOT, help="variant A's tree (this one)")
    p.add_argument("--b-tree", type=Path, default=ROOT, help="variant B's tree (this one)")
    p.add_argument("--a-env", action="append", default=[], metavar="K=V")
    p.add_argument("--b-env", action="append", default=[], metavar="K=V")
    p.add_argument("--a-name", default="A")
    p.add_argument("--b-name", default="B")
    p.add_argument("--cells", default="block-read-32,block-write-32,block-read-1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.5)
    p.add_argument("--note", default="", help="one line kept with the results")
    args = p.parse_args(argv)
    cells = args.cells.split(",")
    for c in cells:
        if c not in CELLS:
            raise SystemExit(f"unknown cell {c!r}: one of {', '.join(CELLS)}")
    variants = {
        "a": (args.a_tree.resolve(), _env(args.a_env), args.a_name),
        "b": (args.b_tree.resolve(), _env(args.b_env), args.b_name),
    }
    got: dict[str, dict[str, list[dict[str, float]]]] = {c: {"a": [], "b": []} for c in cells}
    loads: list[float] = []
    for rnd in range(args.rounds):
        loads.append(os.getloadavg()[0])
        order = ("a", "b") if rnd % 2 == 0 else ("b", "a")  # neither always goes first
        for cell in cells:
            for v in order:
                tree, env, name = variants[v]
                res = run_cell(tree, cell, args.seconds, env)
                got[cell][v].append(res)
                print(f"round {rnd + 1} {cell:15} {name:>10}: {res['rate']:10,.1f}  "
                      f"cpu {res['cpu_us']:7.1f} µs  (load {os.getloadavg()[0]:.1f})",
                      flush=True)  # fmt: skip
    rows = []
    for cell in cells:
        med = {
            v: {k: statistics.median(r[k] for r in got[cell][v]) for k in ("rate", "cpu_us")}
            for v in ("a", "b")
        }
        rows.append(
            {
                "cell": cell,
                "unit": "Gbit/s" if cell.startswith("net") else "IOPS",
                "cpu_unit": "µs/MB" if cell.startswith("net") else "µs/request",
                "a": [round(r["rate"], 2) for r in got[cell]["a"]],
                "b": [round(r["rate"], 2) for r in got[cell]["b"]],
                "a_cpu": [round(r["cpu_us"], 2) for r in got[cell]["a"]],
                "b_cpu": [round(r["cpu_us"], 2) for r in got[cell]["b"]],
                "a_median": round(med["a"]["rate"], 2),
                "b_median": round(med["b"]["rate"], 2),
                "ratio": round(med["a"]["rate"] / med["b"]["rate"], 3),
                "cpu_ratio": round(med["a"]["cpu_us"] / med["b"]["cpu_us"], 3),
            }
        )
    out = {
        "label": args.label,
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "note": args.note,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "load": [round(x, 2) for x in loads],
        "a": {"name": args.a_name, "commit": _commit(variants["a"][0]), "env": variants["a"][1]},
        "b": {"name": args.b_name, "commit": _commit(variants["b"][0]), "env": variants["b"][1]},
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"ab-{args.label}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        a, b = f"{args.a_name} {r['a_median']:,}", f"{args.b_name} {r['b_median']:,}"
        print(
            f"{r['cell']:15} {a} vs {b} {r['unit']}: {r['ratio']:.2f}x; CPU {r['cpu_ratio']:.2f}x"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
