"""virtio-blk end to end through real processes: a ``mic-host`` daemon, a ``mic-card``
card OS and card apps (:mod:`tests.block.apps`).

Durability under SIGKILL of either side is checked with the journal scheme of
:mod:`tests.block.storm`: the assertion is exactly the FLUSH guarantee.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mic_host
from bench.config import block, card
from mic_host.client import Client
from tests.block import storm
from tests.block.conftest import RemoteDaemon
from tests.integration.helpers import micctl
from virtio.errors import BrokenResourceError, MicError

SECTOR = 512
APPS = "tests.block.apps"


def _one_disk(image: Path | str, **options: object) -> str:
    """Card mic0 (the daemon's defaults) with one block disk on ``image``."""
    return card(block(image, **options), card_ram=None, heartbeat_timeout=None)


def app(name: str) -> str:
    return f"{APPS}:{name}"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaps counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _wait_dead(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive after {timeout}s"
        await asyncio.sleep(0.05)


async def _storm_until(client: Client, sd: Path, seed: int) -> tuple[asyncio.Task[Any], int]:
    """Start the storm and wait until a few flushes are journaled; returns (task, prefix)."""
    card = client.card("mic0")
    task = asyncio.create_task(
        card.run(app("write_storm"), "vda", "vdb", seed, 16, 10**9, str(sd / "storm-exit.txt"))
    )
    journal = sd / "journal.img"
    deadline = time.monotonic() + 30
    while True:
        assert not task.done(), task.result()
        _, prefix = storm.read_journal(journal.read_bytes()[:SECTOR], seed)
        if prefix >= 1500:
            return task, prefix
        assert time.monotonic() < deadline, "storm made no progress"
        await asyncio.sleep(0.05)


def _check(sd: Path, seed: int, at_least: int) -> storm.Verdict:
    epoch, prefix = storm.read_journal((sd / "journal.img").read_bytes()[:SECTOR], seed)
    assert prefix >= at_least
    assert epoch > 0
    verdict = storm.check_image((sd / "data.img").read_bytes(), seed, prefix)
    assert verdict.problems == [], verdict
    assert verdict.checked_sectors > 0
    return verdict


async def _digest_matches(client: Client, sd: Path) -> None:
    got = (await client.card("mic0").run(app("digest"), "vda"))["value"]
    assert got == hashlib.sha256((sd / "data.img").read_bytes()).hexdigest()


@pytest.mark.asyncio
async def test_sigkill_card_during_write_storm_keeps_flushed_writes(state_dir: Path) -> None:
    seed = 11
    async with mic_host.launch(state_dir, storm.card_config(data={"num_queues": 2})) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=30)
        task, _ = await _storm_until(client, state_dir, seed)
        pid = (await card.status())["pid"]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(MicError):
            await task
        await card.wait("crashed", timeout=15)
        # what the flush guarantee promises is there, exactly
        verdict = _check(state_dir, seed, 600)
        assert verdict.prefix >= 600
        # the host is unharmed: the card boots again and reads the disk intact
        assert (await client.ping())["pid"] > 0
        await card.boot(wait=True, timeout=60)
        await _digest_matches(client, state_dir)
        _check(state_dir, seed, 600)


@pytest.mark.asyncio
async def test_sigkill_daemon_during_write_storm_keeps_flushed_writes(state_dir: Path) -> None:
    seed = 23
    config = storm.card_config(data={"num_queues": 1})
    card_pid = 0
    with contextlib.suppress(BrokenResourceError):
        async with mic_host.launch(state_dir, config) as client:
            card = client.card("mic0")
            await card.wait("online", timeout=30)
            task, _ = await _storm_until(client, state_dir, seed)
            card_pid = (await card.status())["pid"]
            os.kill((await client.ping())["pid"], signal.SIGKILL)
            with pytest.raises(MicError):
                await task
    # the card notices the lost link by itself and goes away
    await _wait_dead(card_pid, 15)
    card_log = (state_dir / "mic0-card.log").read_text()
    assert "link to the host lost" in card_log
    # what the app saw: its pending I/O failed with a clear error, not a cancellation
    seen = (state_dir / "storm-exit.txt").read_text()
    assert seen.startswith("BrokenResourceError"), seen
    assert "link to the host lost" in seen
    _check(state_dir, seed, 600)
    # a new daemon over the same images: the card boots with the disk intact
    async with mic_host.launch(state_dir, config) as client:
        await client.card("mic0").wait("online", timeout=30)
        await _digest_matches(client, state_dir)


@pytest.mark.asyncio
async def test_read_only_and_out_of_range_refusals(state_dir: Path) -> None:
    ro = state_dir / "ro.img"
    ro.write_bytes(b"golden!!" * 2 * 1024 * 128)  # 2 MiB
    before = ro.read_bytes()
    cfg = _one_disk(ro, read_only=True, serial="RO-DISK-0001")
    async with mic_host.launch(state_dir, cfg) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=30)
        res = (await card.run(app("refusals"), "vda"))["value"]
        assert res["read_only"] is True
        # the driver knows (RO): writes fail; out of range fails; the host says IOERR
        assert res["write"] == 1
        assert res["write_past_end"] == 1
        assert res["read_past_end"] == 1
        assert res["read_far"] == 1
        # a read-only device offers no DISCARD/WRITE_ZEROES: refused as unsupported
        assert res["write_zeroes"] == 2
        assert res["discard"] == 2
        assert bytes.fromhex(res["first"]) == before[:16]
        info = (await card.run(app("info"), "vda"))["value"]
        assert info["serial"] == "RO-DISK-0001"
        assert info["read_only"] is True
        assert info["capacity"] == 4096
        stats = await card.stats()
        assert stats["devices"][0]["errors"] == 0  # refusals are answers, not faults
        # ... counted by the backend, and that reaches the client and micctl stats
        backend = stats["devices"][0]["backend"]
        assert (backend["io_errors"], backend["malformed"]) == (4, 0), backend
        r = await micctl(state_dir, "stats", "mic0")
        assert r.rc == 0, r
        line = next(x for x in r.out.splitlines() if x.startswith("  vda:block"))
        assert "io_errors 4  unsupported 0  malformed 0" in line, r.out
    assert ro.read_bytes() == before


@pytest.mark.asyncio
async def test_attach_block_detach_during_io(state_dir: Path) -> None:
    async with mic_host.launch(state_dir) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=30)
        img = state_dir / "hot.img"
        dev = await card.attach_block(img, size="4M", create=True, serial="HOT", num_queues=2)
        assert dev == "vdb"
        info = (await card.run(app("info"), "vdb"))["value"]
        assert (info["serial"], info["num_queues"], info["capacity"]) == ("HOT", 2, 8192)
        io = asyncio.create_task(card.run(app("io_until_removed"), "vdb", 20.0))
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        await card.detach("vdb")
        res = (await io)["value"]
        assert time.monotonic() - t0 < 10  # nothing hung
        assert res["ok"] > 0
        assert set(res["errors"]) == {"BrokenResourceError"}, res
        assert all("removed" in m for m in res["messages"]), res
        # the card and the other disk are fine
        assert (await card.run(app("info"), "vda"))["value"]["capacity"] > 0
        # the detached image can come back, with what was written to it
        assert await card.attach_block(img, read_only=True) == "vdb"
        with pytest.raises(MicError):
            await card.attach_block(state_dir / "missing.img")


@pytest.mark.asyncio
async def test_micctl_attach_progress_and_detach(state_dir: Path) -> None:
    src = state_dir / "golden.img"
    src.write_bytes(os.urandom(1 << 20) * 24)  # 24 MiB to copy
    async with mic_host.launch(state_dir) as client:
        await client.card("mic0").wait("online", timeout=30)
        base = [sys.executable, "-m", "mic_host.micctl", "--state-dir", str(state_dir)]

        def micctl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*base, *args], capture_output=True, text=True, timeout=60)

        r = await asyncio.to_thread(
            micctl, "attach", "mic0", "block", "--image", "copy.img", "--copy-from", str(src),
            "--size", "32M", "--serial", "COPY",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout == "vdb\n"
        assert "100%" in r.stderr  # plain progress lines (not a TTY)
        assert "\r" not in r.stderr
        copy = state_dir / "copy.img"
        assert copy.stat().st_size == 32 << 20
        assert copy.read_bytes()[: 24 << 20] == src.read_bytes()
        r = await asyncio.to_thread(
            micctl, "attach", "mic0", "block", "--image", "new.img", "--create", "--size", "8M",
            "--preallocate",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout == "vdc\n"
        assert (state_dir / "new.img").stat().st_blocks * 512 >= 8 << 20
        r = await asyncio.to_thread(micctl, "detach", "mic0", "vdb")
        assert r.returncode == 0, r.stderr
        r = await asyncio.to_thread(
            micctl, "attach", "mic0", "block", "--image", "copy.img", "--copy-from", str(src)
        )
        assert r.returncode == 1
        assert "exists" in r.stderr


# -- Hypothesis across real processes: random I/O against a model of the disk ------------

MODEL_CONFIG = _one_disk("{dir}/model.img", size="256K", create=True, num_queues=2)
MODEL_SECTORS = 512


@pytest.fixture(scope="module")
def remote(request: pytest.FixtureRequest) -> Iterator[RemoteDaemon]:
    r = RemoteDaemon(MODEL_CONFIG)
    failed = False
    try:
        yield r
    except BaseException:
        failed = True
        raise
    finally:
        r.close(failed or request.session.testsfailed > 0)


_sector = st.integers(0, MODEL_SECTORS + 4)
_count = st.integers(1, 12)
_op = st.one_of(
    st.tuples(st.just("w"), _sector, _count, st.integers(0, 255)),
    st.tuples(st.just("r"), _sector, _count),
    st.tuples(st.just("z"), _sector, _count),
    st.tuples(st.just("d"), _sector, _count),
    st.tuples(st.just("f")),
)


def _data(count: int, salt: int) -> bytes:
    return bytes((salt + i * 7) & 0xFF for i in range(count * SECTOR))


@settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(_op, min_size=1, max_size=12))
def test_random_io_matches_model_across_processes(
    remote: RemoteDaemon, ops: list[tuple[Any, ...]]
) -> None:
    image = remote.state_dir / "model.img"
    model = bytearray(image.read_bytes())
    cap = len(model) // SECTOR
    wire: list[list[Any]] = []
    expected: list[Any] = []
    for op in ops:
        kind = op[0]
        if kind == "f":
            wire.append(["f"])
            expected.append("ok")
            continue
        sector, count = op[1], op[2]
        inside = sector + count <= cap
        lo, hi = sector * SECTOR, (sector + count) * SECTOR
        if kind == "w":
            data = _data(count, op[3])
            wire.append(["w", sector, data.hex()])
            if inside:
                model[lo:hi] = data
        else:
            wire.append([kind, sector, count])
            if kind in "zd" and inside:
                model[lo:hi] = bytes(hi - lo)  # discarded sectors read back as zeros
        if not inside:
            expected.append(["BlockIOError", 1])
        elif kind == "r":
            expected.append(bytes(model[lo:hi]).hex())
        else:
            expected.append("ok")

    async def run(client: Client) -> Any:
        return (await client.card("mic0").run(app("apply_ops"), "vda", wire))["value"]

    assert remote.call(run) == expected
    assert image.read_bytes() == bytes(model)


@pytest.mark.asyncio
async def test_cancelled_requests_give_their_header_slot_back(state_dir: Path) -> None:
    """The driver's per-request headers come from a pool of card-RAM slots: cancelled
    requests return theirs once the host is done with them, and no two requests in
    flight ever share one (each read returns its own block)."""
    img = state_dir / "blocks.img"
    img.write_bytes(b"".join(b.to_bytes(8, "little") * 512 for b in range(256)))  # 1 MiB
    async with mic_host.launch(state_dir, _one_disk(img, num_queues=2)) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=30)
        res = (await card.run(app("cancel_storm"), "vda", 20))["value"]
    assert res["wrong"] == []
    assert res["cancelled"] > 0, res
    assert res["completed"] > 0, res
    assert res["completed"] + res["cancelled"] == 20 * 96
    assert res["outstanding"] == 0
    assert res["slots"] == res["slots_total"], res  # every slot came back
