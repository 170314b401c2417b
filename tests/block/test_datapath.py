"""The block data path (``data_path = "cpu" | "dma" | "auto"``) through real processes.

A ``dma`` disk moves every aligned request through a host bounce buffer and
the card's DMA engine (vop_vringh.c's path), falls back to a CPU copy for data
off the 64 B grid, and counts both in ``micctl stats``; ``auto`` picks by its
threshold; the engine runs only while such a disk is bound; a card killed in
the middle of a write storm on a ``dma`` disk loses no acknowledged data and
harms neither the daemon nor a neighbour card.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import mic_host
from bench import config as bench_config
from mic_host.backends.block import BlockBackend, _Io
from mic_host.backends.datapath import DMA_ALIGN, DmaLease
from mic_host.client import CardClient
from mic_host.config import parse_config
from tests.block import storm
from tests.integration.helpers import micctl
from transport.dma import DMA_ALIGN as ENGINE_ALIGN
from transport.dma import DmaEngine
from virtio.constants import BlkReqType, BlkStatus
from virtio.errors import ConfigError, MicError
from virtio.memory import FlatMemory

SECTOR = 512
DP = "tests.block.datapath_apps"
APPS = "tests.block.apps"
IMAGE = 4 << 20


def _image(path: Path) -> bytes:
    data = os.urandom(IMAGE)
    path.write_bytes(data)
    return data


async def _devices(card: CardClient) -> dict[str, dict[str, Any]]:
    """Device label -> its stats entry (``device``: the card's name, ``backend``: counters)."""
    return {d["name"]: d for d in (await card.stats())["devices"]}


async def _counters(card: CardClient, label: str) -> dict[str, Any]:
    return dict((await _devices(card))[label]["backend"])


def test_engine_rule_is_the_transport_one() -> None:
    assert DMA_ALIGN == ENGINE_ALIGN


def test_bad_data_path_names_the_device_and_the_choices(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 16))
    text = '[[cards]]\nname = "mic0"\n[[cards.devices]]\ntype = "block"\nname = "data"\n'
    text += f'options = {{ image = "{img}", data_path = "gpu" }}\n'
    with pytest.raises(ConfigError) as e:
        parse_config(text, "mic.toml", state_dir=tmp_path)
    msg = str(e.value)
    assert "cards[0].devices[0].options.data_path" in msg
    assert "cpu, dma, auto" in msg
    assert "'gpu'" in msg
    with pytest.raises(ConfigError, match=r"block 'data': data_path 'fast'.*cpu, dma, auto"):
        BlockBackend(img, name="data", label="block 'data'", data_path="fast")
    bad = text.replace('data_path = "gpu"', 'data_path = "auto", dma_threshold = -1')
    with pytest.raises(ConfigError, match="dma_threshold"):
        parse_config(bad, "mic.toml", state_dir=tmp_path)
    stray = text.replace('data_path = "gpu"', 'data_path = "dma", dma_threshold = "64K"')
    with pytest.raises(ConfigError, match=r"dma_threshold: only a data_path = \"auto\" disk"):
        parse_config(stray, "mic.toml", state_dir=tmp_path)
    default = text.replace('data_path = "gpu"', 'dma_threshold = "64K"')  # the default path
    with pytest.raises(ConfigError, match=r"dma_threshold: only a data_path = \"auto\" disk"):
        parse_config(default, "mic.toml", state_dir=tmp_path)
    plain = parse_config(text.replace(', data_path = "gpu"', ""), "mic.toml", state_dir=tmp_path)
    assert "data_path" not in plain.cards[0].devices[0].options  # the backend's default


@pytest.mark.asyncio
async def test_dma_disk_is_byte_exact_counts_and_falls_back(state_dir: Path) -> None:
    dma_img, auto_img = state_dir / "dma.img", state_dir / "auto.img"
    _image(dma_img)
    _image(auto_img)
    cfg = bench_config.card(
        bench_config.block(dma_img, name="fast", data_path="dma"),
        bench_config.block(auto_img, name="auto", data_path="auto", dma_threshold="64K"),
        card_ram=None,
        heartbeat_timeout=None,
    )
    async with mic_host.launch(state_dir, cfg) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=60)
        devs = await _devices(card)
        vda, vdb = devs["fast"]["device"], devs["auto"]["device"]
        engine = (await card.stats())["vop"]["dma_engine"]
        assert engine == {"running": True, "users": 2, "opens": 1}

        # aligned reads and writes move through the engine and match the image
        data = os.urandom(64 << 10)
        r = await card.run(f"{APPS}:apply_ops", vda, [["w", 16, data.hex()], ["r", 16, 128]])
        assert r["value"] == ["ok", data.hex()]
        r = await card.run(f"{APPS}:apply_ops", vda, [["r", 1000, 8], ["f"]])
        on_disk = dma_img.read_bytes()
        assert on_disk[16 * SECTOR : 16 * SECTOR + len(data)] == data
        assert r["value"][0] == on_disk[1000 * SECTOR : 1008 * SECTOR].hex()
        c = await _counters(card, "fast")
        assert c["data_path"] == "dma"
        assert c["dma_requests"] == 3
        assert c["dma_bytes"] == 2 * len(data) + 8 * SECTOR
        assert c["dma_fallbacks"] == 0

        # data off the 64 B grid: served by CPU, counted, still byte-exact
        r = await card.run(f"{DP}:read_at", vda, 2000, 4096, 8)
        assert r["value"] == [BlkStatus.OK, on_disk[2000 * SECTOR : 2008 * SECTOR].hex()]
        patch = os.urandom(1024)
        r = await card.run(f"{DP}:write_at", vda, 3000, patch.hex(), 24)
        assert r["value"] == BlkStatus.OK
        r = await card.run(f"{DP}:read_at", vda, 3000, 1024, 0)  # aligned: DMA again
        assert r["value"] == [BlkStatus.OK, patch.hex()]
        c = await _counters(card, "fast")
        assert c["dma_fallbacks"] == 2
        assert c["dma_requests"] == 4

        # auto: below its 64K threshold by CPU, at or above it by DMA
        auto_disk = auto_img.read_bytes()
        r = await card.run(f"{DP}:read_at", vdb, 0, 4096, 0)
        assert r["value"] == [BlkStatus.OK, auto_disk[:4096].hex()]
        c = await _counters(card, "auto")
        assert (c["cpu_requests"], c["dma_requests"]) == (1, 0)
        r = await card.run(f"{DP}:read_at", vdb, 256, 128 << 10, 0)
        assert r["value"] == [
            BlkStatus.OK,
            auto_disk[256 * SECTOR : 256 * SECTOR + (128 << 10)].hex(),
        ]
        c = await _counters(card, "auto")
        assert (c["cpu_requests"], c["dma_requests"], c["dma_bytes"]) == (1, 1, 128 << 10)

        # micctl stats shows the counters, as text and as JSON
        text = await micctl(state_dir, "stats", "mic0")
        assert text.rc == 0, text.err
        assert "data_path dma" in text.out
        assert "dma_fallbacks 2" in text.out
        js = await micctl(state_dir, "stats", "mic0", "--json")
        fast = next(d for d in js.json()["devices"] if d["name"] == "fast")
        assert fast["backend"]["dma_requests"] == 4

        # the engine stops with the last disk that uses it
        await card.detach("fast")
        assert (await card.stats())["vop"]["dma_engine"]["users"] == 1
        await card.detach("auto")
        assert (await card.stats())["vop"]["dma_engine"] == {
            "running": False,
            "users": 0,
            "opens": 1,
        }
        # attached again, from micctl, it starts again
        att = await micctl(
            state_dir, "attach", "mic0", "block", "--image", str(dma_img), "--data-path", "dma"
        )
        assert att.rc == 0, att.err
        assert (await card.stats())["vop"]["dma_engine"] == {
            "running": True,
            "users": 1,
            "opens": 2,
        }
        bad = await micctl(
            state_dir, "attach", "mic0", "block", "--image", str(auto_img), "--data-path", "gpu"
        )
        assert bad.rc == 2
        assert "cpu, dma, auto" in bad.err.replace("'", "")


@pytest.mark.asyncio
async def test_cpu_disk_opens_no_engine(state_dir: Path) -> None:
    img = state_dir / "plain.img"
    _image(img)
    cfg = '[[cards]]\nname = "mic0"\nboot_at_start = true\n[[cards.devices]]\ntype = "block"\n'
    cfg += f'name = "plain"\noptions = {{ image = "{img}" }}\n'
    async with mic_host.launch(state_dir, cfg) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=60)
        r = await card.run(f"{APPS}:apply_ops", "vda", [["r", 0, 8]])
        assert r["value"] == [img.read_bytes()[:4096].hex()]
        stats = await card.stats()
        assert stats["vop"]["dma_engine"] == {"running": False, "users": 0, "opens": 0}
        c = (await _devices(card))["plain"]["backend"]
        assert c["data_path"] == "cpu"
        assert c["dma_requests"] == 0
        assert c["cpu_requests"] == 0


def _storm_and_neighbour(near: Path) -> str:
    """The storm's card on DMA disks, and mic1 reading ``near`` through DMA beside it."""
    dma = {"data_path": "dma"}
    mic1 = bench_config.card(
        bench_config.block(near, name="near", data_path="dma"),
        name="mic1",
        card_ram=None,
        heartbeat_timeout=None,
    )
    return storm.card_config(data=dma, journal=dma) + "\n" + mic1


async def _storm_until(card: CardClient, sd: Path, seed: int) -> asyncio.Task[Any]:
    task = asyncio.create_task(
        card.run(f"{APPS}:write_storm", "vda", "vdb", seed, 16, 10**9, str(sd / "exit.txt"))
    )
    deadline = time.monotonic() + 60
    while True:
        assert not task.done(), task.result()
        _, prefix = storm.read_journal((sd / "journal.img").read_bytes()[:SECTOR], seed)
        if prefix >= 1000:
            return task
        assert time.monotonic() < deadline, "storm made no progress"
        await asyncio.sleep(0.05)


async def _digest(card: CardClient, dev: str) -> str:
    return str((await card.run(f"{APPS}:digest", dev))["value"])


@pytest.mark.asyncio
async def test_sigkill_card_mid_storm_on_dma_disk(state_dir: Path) -> None:
    seed = 31
    near = state_dir / "near.img"
    near_head = _image(near)[: 64 << 10].hex()
    async with mic_host.launch(state_dir, _storm_and_neighbour(near)) as client:
        mic0, mic1 = client.card("mic0"), client.card("mic1")
        await mic0.wait("online", timeout=60)
        await mic1.wait("online", timeout=60)
        stop = asyncio.Event()
        neighbour = asyncio.create_task(_neighbour_io(mic1, near_head, stop))
        task = await _storm_until(mic0, state_dir, seed)
        assert (await _counters(mic0, "data"))["dma_requests"] > 500
        os.kill((await mic0.status())["pid"], signal.SIGKILL)
        with pytest.raises(MicError):
            await task
        await mic0.wait("crashed", timeout=30)
        # every write a completed FLUSH covered is on disk, exactly
        epoch, prefix = storm.read_journal((state_dir / "journal.img").read_bytes()[:SECTOR], seed)
        assert epoch > 0
        assert prefix >= 1000
        verdict = storm.check_image((state_dir / "data.img").read_bytes(), seed, prefix)
        assert verdict.problems == [], verdict
        # the neighbour kept serving through it, and the daemon is fine
        stop.set()
        assert await neighbour >= 2
        assert (await mic1.status())["state"] == "online"
        assert (await client.ping())["pid"] > 0
        # the crashed card boots again with a fresh engine and reads its disk intact
        await mic0.boot(wait=True, timeout=60)
        want = hashlib.sha256((state_dir / "data.img").read_bytes()).hexdigest()
        assert await _digest(mic0, "vda") == want
        assert (await mic0.stats())["vop"]["dma_engine"]["running"] is True


async def _neighbour_io(card: CardClient, want: str, stop: asyncio.Event) -> int:
    """Reads of the neighbour's dma disk while mic0 storms and dies, and one more
    after; each checked against ``want`` (its first 64 KiB). Returns how many ran."""
    rounds = 0
    while True:
        last = stop.is_set()
        r = await card.run(f"{DP}:read_at", "vda", 0, 64 << 10, 0)
        assert r["value"] == [BlkStatus.OK, want]
        rounds += 1
        if last:
            return rounds


@pytest.mark.asyncio
async def test_a_failed_dma_copy_is_an_ioerr_never_an_ack(tmp_path: Path) -> None:
    """The engine closed under a request (a card going down) or an address the
    card made unreachable: the request answers IOERR, its data is not claimed."""
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(1 << 16))
    backend = BlockBackend(img, name="d", data_path="dma")
    mem = FlatMemory(1 << 20)
    bounce, card_buf = 1 << 19, 4096
    try:
        async with DmaEngine(mem) as engine:
            backend.datapath.lease = DmaLease(engine, mem.view(bounce, 1 << 16, True), bounce)
            view = mem.view(card_buf, 4096, True)
            ok = _Io(BlkReqType.IN, 4096, 4096, [view], dma=[(card_buf, 4096)])
            assert backend._execute(ok) == (BlkStatus.OK, 4096)
            assert bytes(view) == img.read_bytes()[4096:8192]
            unreachable = _Io(BlkReqType.IN, 0, 4096, [view], dma=[(2 << 20, 4096)])
            assert backend._execute(unreachable) == (BlkStatus.IOERR, 0)
        view[:] = bytes(4096)
        late = _Io(BlkReqType.IN, 0, 4096, [view], dma=[(card_buf, 4096)])
        assert backend._execute(late) == (BlkStatus.IOERR, 0)  # engine closed
        assert bytes(view) == bytes(4096)
        assert backend.stats()["dma_requests"] == 1
        assert backend.stats()["io_errors"] == 0  # counted by _complete, not here
    finally:
        await backend.aclose()
