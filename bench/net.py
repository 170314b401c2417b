"""virtio-net throughput: iperf3 TCP through the card's NIC against two baselines.

Measured in one run, each for ``--seconds`` of iperf3 TCP, both directions:

- ``virtio-net``: a ``mic-host`` daemon with one card whose NIC uses the ``tap``
  backend; the host TAP sits in namespace H (172.31.1.254), the card's TAP in
  the card's namespace C (172.31.1.1). Host -> card: iperf3 client in H,
  server in C; card -> host: the reverse. Every byte crosses the host TAP, the
  host backend, the rings in shared memory, the card driver and the card TAP.
- ``veth``: a veth pair between two namespaces (the kernel's own path, the
  ceiling).
- ``relay``: two namespaces, each with a plain TAP (no vnet header, no
  offloads), and a minimal Python process copying frames between them with
  ``select`` + ``os.read``/``os.write``: what a naive userspace path gets.

For the card it also reports how big the packets crossing the rings are in
the data's direction (the NIC's byte and packet counters over each run):
~64 KiB when TSO segments stay whole end to end, ~1.5 KiB if they do not.

Target (issue "virtio-net end to end"): >= 0.5x veth and above the relay.
Needs root, iproute2 and iperf3; run ``python -m bench.net [--seconds S] [--no-relay]``;
writes ``bench/results/net.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results") / "net.json"
TARGET_VS_VETH = 0.5

RELAY = r"""
import os, select, sys
from transport.tap import Tap
# Plain Ethernet frames (no vnet header, no offloads): the relay is the baseline.
a, b = (Tap.open(sys.argv[i], netns=sys.argv[i + 1], vnet_hdr=False) for i in (1, 3))
for t in (a, b):
    os.set_blocking(t.fd, True)
print("ready", flush=True)
peer = {a.fd: b.fd, b.fd: a.fd}
while True:
    for fd in select.select(list(peer), [], [])[0]:
        os.write(peer[fd], os.read(fd, 65536))
"""


async def stop(proc: asyncio.subprocess.Process, grace: float = 0.0) -> None:
    """Give ``proc`` ``grace`` seconds to exit on its own, then SIGKILL it; reap it.

    ``os.kill``, not ``proc.kill()``: ``Popen.send_signal`` polls first, and a
    child that has just exited (iperf3 ``-s -1`` does, after its one test) is
    then reaped behind asyncio's child watcher, which logs "Unknown child
    process pid N, will report returncode 255".
    """
    if grace > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await proc.wait()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def namespaces(*names: str) -> Iterator[None]:
    try:
        for n in names:
            ip("netns", "add", n)
            ip("-n", n, "link", "set", "lo", "up")
        yield
    finally:
        for n in names:
            subprocess.run(["ip", "netns", "del", n], check=False, capture_output=True)


async def iperf(server_ns: str, client_ns: str, addr: str, seconds: float) -> float:
    """Gbit/s received by an iperf3 server in ``server_ns`` from a client in ``client_ns``."""
    srv = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", addr,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.sleep(0.4)
        cli = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", client_ns, "iperf3", "-c", addr, "-t", str(seconds), "-J",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await cli.communicate()
        if cli.returncode != 0:
            raise RuntimeError(f"iperf3 failed: {out.decode()[-500:]} {err.decode()[-500:]}")
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        await stop(srv, grace=2.0)  # -1: it exits after the client's test


async def veth(seconds: float) -> dict[str, float]:
    a, b = f"mvba-{uuid.uuid4().hex[:5]}", f"mvbb-{uuid.uuid4().hex[:5]}"
    with namespaces(a, b):
        ip("link", "add", "mvva", "netns", a, "type", "veth", "peer", "name", "mvvb", "netns", b)
        ip("-n", a, "addr", "add", "10.201.0.1/24", "dev", "mvva")
        ip("-n", b, "addr", "add", "10.201.0.2/24", "dev", "mvvb")
        ip("-n", a, "link", "set", "mvva", "up")
        ip("-n", b, "link", "set", "mvvb", "up")
        return {
            "a_to_b": await iperf(b, a, "10.201.0.2", seconds),
            "b_to_a": await iperf(a, b, "10.201.0.1", seconds),
        }


async def relay(seconds: float) -> dict[str, float]:
    a, b = f"mvra-{uuid.uuid4().hex[:5]}", f"mvrb-{uuid.uuid4().hex[:5]}"
    with namespaces(a, b):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RELAY, "mvra", a, "mvrb", b, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            await proc.stdout.readline()
            ip("-n", a, "addr", "add", "10.202.0.1/24", "dev", "mvra")
            ip("-n", b, "addr", "add", "10.202.0.2/24", "dev", "mvrb")
            ip("-n", a, "link", "set", "mvra", "up")
            ip("-n", b, "link", "set", "mvrb", "up")
            return {
                "a_to_b": await iperf(b, a, "10.202.0.2", seconds),
                "b_to_a": await iperf(a, b, "10.202.0.1", seconds),
            }
        finally:
            await stop(proc)


@contextlib.asynccontextmanager
async def card_net(
    state: Path, hns: str, cns: str, env: dict[str, str] | None = None
) -> AsyncIterator[Any]:
    """Card ``mic0`` online with a TAP NIC between host namespace ``hns`` and card
    namespace ``cns``, its link up; ``env`` is added to the daemon's environment."""
    import mic_host

    cfg = (
        'version = 1\n[[cards]]\nname = "mic0"\ncard_ram = "64M"\nhost_ram = "4M"\n'
        '[[cards.devices]]\ntype = "net"\nname = "net0"\n'
        f'options = {{ backend = "tap", ifname = "mvb{uuid.uuid4().hex[:5]}", netns = "{hns}", '
        f'card_netns = "{cns}" }}\n'
    )
    async with mic_host.launch(state, cfg, env=env) as client:
        card = client.card("mic0")
        await card.boot(wait=True, timeout=30)
        deadline = time.monotonic() + 20
        while True:
            r = await card.net()
            info = r["devices"][0].get("card") or {}
            if info.get("mode") == "tap" and info.get("link") == "up":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the card's NIC did not come up: {r}")
            await asyncio.sleep(0.1)
        yield card


async def virtio_net(seconds: float) -> dict[str, Any]:
    hns, cns = f"mvbh-{uuid.uuid4().hex[:5]}", f"mvbc-{uuid.uuid4().hex[:5]}"
    state = Path(tempfile.mkdtemp(prefix="micb", dir="/tmp"))
    try:
        with namespaces(hns):
            async with card_net(state, hns, cns) as card:
                res: dict[str, Any] = {}
                packets: dict[str, float] = {}
                # (direction, server ns, client ns, address, the data's counters)
                for direction, srv, cli, addr, key in (
                    ("host_to_card", cns, hns, "172.31.1.1", "rx"),
                    ("card_to_host", hns, cns, "172.31.1.254", "tx"),
                ):
                    c0 = (await card.net())["devices"][0]["counters"]
                    res[direction] = await iperf(srv, cli, addr, seconds)
                    c1 = (await card.net())["devices"][0]["counters"]
                    n = c1[f"{key}_packets"] - c0[f"{key}_packets"]
                    b = c1[f"{key}_bytes"] - c0[f"{key}_bytes"]
                    # how big the frames crossing the rings are (TSO kept whole?)
                    packets[direction] = b / n if n else 0.0
                d = (await card.net())["devices"][0]
                res["offloads"] = d.get("offloads")
                res["counters"] = d.get("counters")
                res["bytes_per_packet"] = packets
                return res
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def run(seconds: float, *, with_relay: bool = True) -> dict[str, Any]:
    v = await veth(seconds)
    r = await relay(seconds) if with_relay else None
    n = await virtio_net(seconds)
    veth_gbps = (v["a_to_b"] + v["b_to_a"]) / 2
    relay_gbps = (r["a_to_b"] + r["b_to_a"]) / 2 if r is not None else None
    rows = []
    for direction in ("host_to_card", "card_to_host"):
        g = n[direction]
        rows.append(
            {
                "direction": direction,
                "gbps": g,
                "veth_gbps": veth_gbps,
                "relay_gbps": relay_gbps,
                "vs_veth": g / veth_gbps,
                "vs_relay": g / relay_gbps if relay_gbps else None,
                "bytes_per_packet": n["bytes_per_packet"][direction],
                "met": g / veth_gbps >= TARGET_VS_VETH and (relay_gbps is None or g > relay_gbps),
            }
        )
    return {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": seconds,
        "veth": v,
        "relay": r,
        "virtio_net": n,
        "rows": rows,
        "target_vs_veth": TARGET_VS_VETH,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="iperf3 time per measurement")
    p.add_argument(
        "--json", type=Path, default=None, help=f"default {RESULTS} (not written with --no-relay)"
    )
    p.add_argument(
        "--no-relay",
        action="store_true",
        help="skip the Python relay (quick rounds: veth and the card's NIC only; "
        "writes no results file unless --json is given)",
    )
    args = p.parse_args(argv)
    from transport.tap import tap_privilege_problem

    problem = tap_privilege_problem()
    if problem is not None or shutil.which("iperf3") is None:
        print(f"bench.net skipped: {problem or 'iperf3 is not installed'}")
        return 0
    result = asyncio.run(run(args.seconds, with_relay=not args.no_relay))
    out = args.json or (None if args.no_relay else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        relay = f"  relay {row['relay_gbps']:6.2f}" if row["relay_gbps"] is not None else ""
        versus = f", {row['vs_relay']:.2f}x relay" if row["vs_relay"] is not None else ""
        print(
            f"{row['direction']:>13}: {row['gbps']:6.2f} Gbit/s  veth {row['veth_gbps']:6.2f}"
            f"{relay}  -> {row['vs_veth']:.2f}x veth{versus}"
            f"  ({row['bytes_per_packet'] / 1024:.1f} KiB per packet on the rings)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
