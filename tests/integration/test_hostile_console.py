"""A hostile card attacks the host through its console (issue 14, item 1 and the
console log of item 6), next to a healthy card; all through real processes.

The hostile card (1 GiB of card RAM) posts one transmit chain of 16 x 64 MiB
on hvc0, the same on the console's control queue, a flood of valid 1 MiB
chains and a burst of malformed control messages. Before the fix the daemon
copied the whole 1 GiB chain on its event loop (RSS +2 GiB, a loop stall of
seconds, the neighbour marked crashed for a missed heartbeat, 1 GiB appended
to the console log). Now: the neighbour keeps its heartbeats and its block and
console operations stay fast, the daemon's RSS peak grows by less than 64 MiB,
the console log stays under its cap (rotated, 0600), and the daemon log gets a
bounded number of lines about it.
"""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from mic_host.backends.console_log import LOG_MAX_BYTES
from mic_host.client import CardClient, Client
from tests.integration.helpers import app, booted, card_toml, config, daemon

HOSTILE = "tests.integration.hostile_console"
MIB = 1 << 20


def hostile(fn: str) -> str:
    return f"{HOSTILE}:{fn}"


def _vm(pid: int, key: str) -> int:
    """``VmRSS``/``VmHWM`` of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for {pid}")


class Neighbour:
    """The healthy card's work while the hostile one attacks: verified block
    writes and reads, console writes, and daemon pings; the worst latencies."""

    def __init__(self, client: Client, card: CardClient, state_dir: Path) -> None:
        self.client = client
        self.card = card
        self.log = state_dir / "mic1-console.log"
        self.ops = 0
        self.worst_op = 0.0
        self.pings = 0
        self.worst_ping = 0.0
        self.stop = asyncio.Event()

    async def work(self) -> None:
        loop = asyncio.get_running_loop()
        i = 0
        while not self.stop.is_set():
            t0 = loop.time()
            text = f"neighbour {i}"
            await self.card.run(app("write_text"), "vda", i % 8, text)
            got = await self.card.run(app("read_text"), "vda", i % 8, len(text))
            assert got["value"] == text
            assert (await self.card.run(app("console_write"), f"tick {i}\n"))["value"]
            self.worst_op = max(self.worst_op, loop.time() - t0)
            self.ops += 1
            i += 1

    async def ping(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            t0 = loop.time()
            await self.client.ping()
            self.worst_ping = max(self.worst_ping, loop.time() - t0)
            self.pings += 1
            await asyncio.sleep(0.02)


@pytest.mark.timeout(180)
@pytest.mark.asyncio
async def test_hostile_console_chains_hurt_no_one(state_dir: Path) -> None:
    cfg = config(card_toml("mic0", card_ram="1G"), card_toml("mic1"))
    async with daemon(state_dir, cfg) as client:
        bad = await booted(client, "mic0")
        good = await booted(client, "mic1")
        pid = (await client.ping())["pid"]
        await good.run(app("console_write"), "warm up\n")
        base_hwm = _vm(pid, "VmHWM")

        nb = Neighbour(client, good, state_dir)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(nb.work())
            tg.create_task(nb.ping())
            await asyncio.sleep(0.5)  # the neighbour's latency before the attack is in too
            try:
                # one 1 GiB transmit chain: returned unread, at once
                big = (await bad.run(hostile("console_chain"), "port0", 16, 64 * MIB))["value"]
                # one 1 GiB control chain: rejected unread
                ctl = (await bad.run(hostile("console_chain"), "control", 16, 64 * MIB))["value"]
                # valid chains of the largest size accepted: 20 MiB of output, streamed
                flood = (await bad.run(hostile("console_flood"), 20, MIB))["value"]
                # a burst of malformed control messages
                await bad.run(hostile("control_garbage_flood"), 300, 16)
                await asyncio.sleep(1.5)  # several heartbeat periods after the attack
            finally:
                nb.stop.set()

        assert (big["used"], big["bytes"]) == (0, 1 << 30)
        assert (ctl["used"], ctl["bytes"]) == (0, 1 << 30)
        assert big["elapsed"] < 2.0, big
        assert flood["chains"] == 20

        # the neighbour kept its heartbeats and its operations stayed fast
        st = await good.status()
        assert st["state"] == "online", st
        assert nb.ops >= 3, nb.ops
        assert nb.pings >= 10, nb.pings
        assert nb.worst_op < 2.0, f"a neighbour operation took {nb.worst_op:.2f}s"
        assert nb.worst_ping < 1.0, f"a ping took {nb.worst_ping:.2f}s"
        assert (await client.status())["cards"]
        assert (await bad.status())["state"] == "online"

        # the daemon's memory did not grow with the chains
        growth = _vm(pid, "VmHWM") - base_hwm
        assert growth < 64 * MIB, f"daemon RSS peak grew by {growth / MIB:.0f} MiB"

        # the hostile card's console still works; its log stays under the cap, 0600
        assert (await bad.run(app("console_write"), "still here\n"))["value"] == 11
        log = state_dir / "mic0-console.log"
        rotated = state_dir / "mic0-console.log.1"

        async def logged() -> bool:
            return b"still here" in log.read_bytes()

        for _ in range(100):
            if await logged():
                break
            await asyncio.sleep(0.05)
        assert await logged()
        for path in (log, rotated):
            info = path.stat()
            assert info.st_size <= LOG_MAX_BYTES, (path, info.st_size)
            assert stat.S_IMODE(info.st_mode) == 0o600, (path, oct(info.st_mode))
        assert b"flood flood" in rotated.read_bytes()
        assert b"tick 0\n" in nb.log.read_bytes()

        # what the daemon logged about it is bounded
        hostlog = (state_dir / "mic-host.log").read_text()
        assert "no heartbeat" not in hostlog
        assert "over the 1048576-byte limit dropped unread" in hostlog
        assert "not read" in hostlog  # the control chain
        rejected = hostlog.count("rejected control message from the card")
        assert 1 <= rejected <= 30, rejected
        assert "similar log lines" in hostlog
