"""One card can never hurt another (issue 14): a seeded hostile-card campaign of at
least 10,000 rounds next to a healthy card doing verified block I/O, through real
processes (one ``mic-host``, two ``mic-card``).

The hostile card's app (:mod:`tests.integration.hostile_campaign`) writes
garbage into its own rings and device-page entries and kicks, round after
round; its devices go NEEDS_RESET and it resets them. The campaign passes when
the daemon never crashed and kept answering, the healthy card stayed online
on its first boot with its heartbeat fresh, and every block it wrote read back
the same. A run takes about 30 s on two busy cores; the seed is fixed, so a
failure reproduces.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from mic_host.card.session import pump_doorbells
from mic_host.client import CardClient, Client
from tests.integration.helpers import HEARTBEAT, block_toml, booted, card_toml, config, daemon
from transport import Mmio, MmioLayout, Region
from virtio.errors import BrokenResourceError

CAMPAIGN = "tests.integration.hostile_campaign"
ROUNDS = 10_000
SEED = 14
HOSTILE_DEVICES = ["vda", "vdb", "hvc0"]


def isolation_config(state_dir: Path) -> str:
    """A healthy ``mic0`` (console, 1 MiB disk) and a hostile ``mic1`` (console, two disks;
    a looser heartbeat bound: it is busy attacking, and its own fate is not the point)."""
    hostile = card_toml("mic1", heartbeat_timeout=10.0)
    hostile += block_toml(str(state_dir / "mic1-b.img"), name="disk2")
    return config(card_toml("mic0"), hostile)


async def run_campaign(card: CardClient, rounds: int, seed: int) -> dict[str, Any]:
    """Rounds on ``card`` from ``seed`` until ``rounds`` were played; a card the app
    could not repair is reset and booted, then the campaign goes on with the next seed.

    ``faults`` counts the ring faults the host saw on the card's devices over every
    boot: a card reset starts the devices' counters again, so they are added up
    before each reset and once more at the end."""
    total: dict[str, Any] = {
        "rounds": 0,
        "episodes": 0,
        "resets": 0,
        "card_resets": 0,
        "faults": 0,
    }
    while total["rounds"] < rounds:
        res = (
            await card.run(f"{CAMPAIGN}:campaign", seed, rounds - total["rounds"], HOSTILE_DEVICES)
        )["value"]
        for k in ("rounds", "episodes", "resets"):
            total[k] += res[k]
        seed += 1
        if res["needs_card_reset"]:
            total["card_resets"] += 1
            total["faults"] += await host_faults(card)
            await card.reset()
            await card.boot(wait=True, timeout=30)
    total["faults"] += await host_faults(card)
    return total


async def host_faults(card: CardClient) -> int:
    """Ring faults the host counted on ``card``'s devices since its last boot."""
    return sum(d["errors"] for d in (await card.stats())["devices"])


class Neighbour:
    """The healthy card: verified block I/O in chunks, and its status sampled meanwhile."""

    def __init__(self, client: Client, card: CardClient) -> None:
        self.client = client
        self.card = card
        self.ops = 0
        self.errors: list[str] = []
        self.samples: list[dict[str, Any]] = []
        self.stop = asyncio.Event()

    async def io(self) -> None:
        seed = 0
        while not self.stop.is_set():
            res = (await self.card.run(f"{CAMPAIGN}:verified_io", "vda", seed, 0, 2.0))["value"]
            self.ops += res["ops"]
            self.errors += res["errors"]
            seed += 1

    async def watch(self) -> None:
        while not self.stop.is_set():
            st = await self.card.status()
            await self.client.ping()
            self.samples.append(st)
            await asyncio.sleep(0.1)


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_hostile_campaign_leaves_the_neighbour_and_the_daemon_alone(
    state_dir: Path,
) -> None:
    async with daemon(state_dir, isolation_config(state_dir)) as client:
        good = await booted(client, "mic0")
        bad = await booted(client, "mic1")
        daemon_pid = (await client.ping())["pid"]
        first = await good.status()

        healthy = Neighbour(client, good)
        t0 = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            io = tg.create_task(healthy.io())
            watch = tg.create_task(healthy.watch())
            total = await run_campaign(bad, ROUNDS, SEED)
            healthy.stop.set()
            await asyncio.gather(io, watch)
        elapsed = time.monotonic() - t0

        # the campaign ran and the host saw it: faults, NEEDS_RESETs, resets
        assert total["rounds"] >= ROUNDS
        assert total["resets"] >= total["episodes"] // 2
        faults = total["faults"]
        assert faults >= total["episodes"] // 4, total

        # the daemon: same process, answering
        assert (await client.ping())["pid"] == daemon_pid
        # the neighbour: online all along on its first boot, heartbeat fresh, no errors
        assert healthy.errors == []
        assert healthy.ops > 100
        assert healthy.samples
        for st in healthy.samples:
            assert (st["state"], st["pid"], st["boots"]) == ("online", first["pid"], 1), st
            assert st["last_error"] is None
            assert st["heartbeat_age"] < HEARTBEAT["heartbeat_timeout"], st
        ages = [st["heartbeat_age"] for st in healthy.samples]
        print(
            f"{total} in {elapsed:.1f} s; healthy: {healthy.ops} verified ops, "
            f"max heartbeat age {max(ages):.3f} s over {len(ages)} samples; host faults {faults}"
        )
        # and the hostile card can be made whole again
        await bad.reset()
        await bad.boot(wait=True, timeout=30)
        assert (await bad.run("tests.integration.apps:echo"))["value"]["card"] == "mic1"


@pytest.mark.asyncio
async def test_a_card_that_never_stops_ringing_leaves_the_loop_to_others() -> None:
    """The doorbell pump of a card that rings again as soon as it is served (a real
    MMIO, its vector never idle) still leaves the event loop to other work: one
    delivery per loop iteration, other tasks' turns in between."""
    layout = MmioLayout(h2c_doorbells=4, c2h_doorbells=4, card_vectors=2, host_vectors=2)
    host = Mmio.create(layout)
    region = Region.adopt("mmio", os.dup(host.region.fd), host.region.size)
    efds = tuple(os.dup(fd) for fd in host.eventfds)
    card = Mmio.adopt(region, layout, efds[:2], efds[2:])
    served: list[int] = []
    turns = 0
    limit = 5_000

    def on_doorbell(db: int) -> None:
        served.append(db)
        if len(served) >= limit:
            host.fail(BrokenResourceError("link lost"))
            return
        card.doorbell(0).ring()  # the hostile card: another ring at once
        card.doorbell(2).ring()

    async def neighbour() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(neighbour())
    try:
        await asyncio.sleep(0)
        card.doorbell(0).ring()
        with pytest.raises(BrokenResourceError):
            async with asyncio.timeout(60):
                await pump_doorbells(host, on_doorbell)
    finally:
        other.cancel()
        card.close()
        host.close()
    assert len(served) >= limit
    assert set(served) == {0, 2}  # both doorbells route to vector 0, each acked and served
    # the neighbour ran between deliveries: about one turn per delivery (two doorbells each)
    assert turns >= len(served) // 2 // 2, (turns, len(served))


#: The healthy p99 bound this test holds the tree to. The goal itself (2x,
#: ``bench.isolation.GOALS["p99_ratio"]``) is a benchmark figure, measured by
#: ``python -m bench.isolation`` (1.88x on 30 s phases; 1.2-1.8x on this short
#: run since the doorbell pump yields while a card keeps ringing, 2.2-4.3x
#: before). A timed test on a shared 2-core machine holds a looser line, 3x,
#: which still catches a daemon that stalls for a card (the 1 GiB console chain
#: gave ~1000x, the unyielding pump 3-4x); one retry absorbs a run stalled by
#: other processes.
P99_RATIO_BOUND = 3.0


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_isolation_goals_short_bench() -> None:
    """``bench.isolation`` in short, with every attack
    (:data:`bench.isolation.DEFAULT_ATTACKS`): 0 missed heartbeats, daemon RSS
    growth at most 64 MiB, no healthy-card error, healthy p99 within
    :data:`P99_RATIO_BOUND` of its p99 alone.

    Errors, a dead daemon and RSS growth fail at once; the two timing goals get
    one more measurement, as the other processes on two shared cores can
    stall any one run (a real isolation failure shows in both).
    """
    from bench import isolation

    for attempt in range(2):
        res = await isolation.amain(5.0, isolation.DEFAULT_ATTACKS, seed=SEED + attempt)
        alone, nb = res["phases"]
        print(isolation.table(res))
        assert alone["errors"] == nb["errors"] == []
        assert nb["daemon_alive"]
        assert nb["rss_growth_mib"] <= isolation.GOALS["rss_growth_mib"]
        assert nb["ops"] > 100
        assert nb["console_echoes"] > 10
        assert nb["hostile"]["rounds"] > 0
        assert "link_nested" not in res["attacks"] or nb["hostile"]["nested_frames"] > 0
        if res["block_p99_ratio"] <= P99_RATIO_BOUND and res["met"]["missed_heartbeats"]:
            break
    else:
        pytest.fail(
            f"timing goals not met twice: p99 ratio {res['block_p99_ratio']}, "
            f"missed heartbeats {nb['missed_heartbeats']}"
        )
