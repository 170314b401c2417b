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
import time
from pathlib import Path
from typing import Any

import pytest

from mic_host.card.session import PUMP_SLICE_NS, pump_doorbells
from mic_host.client import CardClient, Client
from tests.integration.helpers import HEARTBEAT, block_toml, booted, card_toml, config, daemon
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
    could not repair is reset and booted, then the campaign goes on with the next seed."""
    total: dict[str, Any] = {"rounds": 0, "episodes": 0, "resets": 0, "card_resets": 0}
    while total["rounds"] < rounds:
        res = (
            await card.run(f"{CAMPAIGN}:campaign", seed, rounds - total["rounds"], HOSTILE_DEVICES)
        )["value"]
        for k in ("rounds", "episodes", "resets"):
            total[k] += res[k]
        seed += 1
        if res["needs_card_reset"]:
            total["card_resets"] += 1
            await card.reset()
            await card.boot(wait=True, timeout=30)
    return total


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
        faults = sum(d["errors"] for d in (await bad.stats())["devices"])
        assert faults >= total["episodes"] // 4, (faults, total)

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


class _RingingVector:
    """Vector 0 of a card that never stops ringing: every wait returns at once, it
    never sleeps; after ``limit`` waits the link is lost."""

    def __init__(self, limit: int) -> None:
        self.sleeps = 0
        self.waits = 0
        self.limit = limit

    async def wait(self) -> int:
        self.waits += 1
        if self.waits > self.limit:
            raise BrokenResourceError("link lost")
        return 1


class _RingingMmio:
    def __init__(self, vec: _RingingVector) -> None:
        self.vec = vec

    def vector(self, v: int) -> _RingingVector:
        assert v == 0
        return self.vec

    def ack_doorbells(self, vector: int) -> frozenset[int]:
        return frozenset({0, 1})


@pytest.mark.asyncio
async def test_a_card_that_never_stops_ringing_leaves_the_loop_to_others() -> None:
    """The doorbell pump of a card whose vector never sleeps still gives the event
    loop a turn at least every ``PUMP_SLICE_NS`` (other cards' work interleaves)."""
    vec = _RingingVector(limit=20_000)
    mmio = _RingingMmio(vec)
    served: list[int] = []
    turns = 0

    async def neighbour() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    t0 = time.perf_counter()
    other = asyncio.create_task(neighbour())
    await asyncio.sleep(0)
    with pytest.raises(BrokenResourceError):
        await pump_doorbells(mmio, served.append)  # type: ignore[arg-type]
    elapsed_ns = (time.perf_counter() - t0) * 1e9
    other.cancel()
    assert len(served) == 2 * vec.limit
    # one turn per slice of pumping, at least (a starving pump gives 1: before it started)
    assert turns >= max(2, elapsed_ns // PUMP_SLICE_NS // 2), (turns, elapsed_ns)


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
