"""Drivers at run time, through real processes: unbind/bind, probe failures, raw claims.

One daemon (``mic_host.launch``) for the module, with a console and a block
device over an image filled with random bytes here. The card apps are the
functions below (run as ``tests.card.test_binding:fn``), including a minimal
virtio-blk driver written with ``card.claim()``: it negotiates features,
sets up the queue, and reads the image's first sectors through the ring core.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import mic_host
from mic_card.bus import DeviceBusyError, DriverProbeError, UnknownDriverError
from mic_card.drivers import BlockDevice
from mic_card.services import CardServices
from mic_host.client import CardClient
from virtio.blk import REQ_HEADER, REQ_HEADER_SIZE
from virtio.constants import BlkReqType, BlkStatus, Feature
from virtio.errors import BrokenResourceError, ClosedResourceError, MicError

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECTOR = 512
IMAGE_BYTES = 1 << 20
#: an app's claim is held in its name: ``app ID module:function`` (the id ``micctl kill`` takes)
HOLDER_RE = rf"app \d+ {re.escape(__name__)}:hold"


def app(fn: str) -> str:
    return f"{__name__}:{fn}"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def env() -> AsyncIterator[tuple[CardClient, Path, bytes]]:
    state = Path(tempfile.mkdtemp(prefix="mic", dir="/tmp"))
    image = os.urandom(IMAGE_BYTES)
    (state / "disk.img").write_bytes(image)
    config = f"""
[[cards]]
name = "mic0"
boot_at_start = true

[[cards.devices]]
type = "console"

[[cards.devices]]
type = "block"
name = "disk"
options = {{ image = "{state}/disk.img" }}
"""
    try:
        async with mic_host.launch(state_dir=state, config=config) as client:
            card = client.card("mic0")
            await card.wait("online", timeout=60)
            yield card, state, image
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _micctl(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "mic_host.micctl", "--state-dir", str(state), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


async def micctl(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(_micctl, state, *args)


def row(rows: list[dict[str, Any]], device: str) -> dict[str, Any]:
    return next(r for r in rows if r["device"] == device)


async def status_row(card: CardClient, device: str, want_state: str) -> dict[str, Any]:
    """The device's entry in ``status`` once the card reported ``want_state`` (pushed)."""
    deadline = time.monotonic() + 10
    while True:
        entry = next(d for d in (await card.status())["devices"] if d["device"] == device)
        if entry["state"] == want_state or time.monotonic() > deadline:
            return entry
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ card apps


def _blk(card: CardServices, name: str) -> BlockDevice:
    blk = card.device(name)
    assert isinstance(blk, BlockDevice)
    return blk


async def read_blk(card: CardServices, name: str, sector: int, count: int) -> str:
    """Read through the bound virtio-blk driver; hex."""
    return (await _blk(card, name).read(sector, count)).hex()


async def raw_read(card: CardServices, name: str, count: int) -> dict[str, Any]:
    """A minimal virtio-blk driver on a claimed device: read sectors 0..count-1."""
    async with card.claim(name) as dev:
        during = {d["name"]: (d["state"], d["holder"]) for d in card.devices()}[name]
        assert dev.device_type == 2
        offered = dev.offered_features
        acked = await dev.negotiate(Feature.VERSION_1 | Feature.EVENT_IDX)
        (q,) = await dev.setup_queues()
        await dev.driver_ok()
        capacity = int.from_bytes(dev.read_config()[:8], "little")
        mem = dev.memory
        hdr, data, status = dev.alloc(REQ_HEADER_SIZE), dev.alloc(count * SECTOR), dev.alloc(1)
        mem.view(hdr, REQ_HEADER_SIZE, True)[:] = REQ_HEADER.pack(BlkReqType.IN, 0)
        mem.view(status, 1, True)[0] = 0xFF
        q.ring.add([(hdr, REQ_HEADER_SIZE)], [(data, count * SECTOR), (status, 1)], "read")
        q.publish()
        token, length = await asyncio.wait_for(q.get_used(), 10)
        return {
            "during": list(during),
            "offered": offered,
            "acked": acked,
            "capacity": capacity,
            "token": token,
            "length": length,
            "status": mem.view(status, 1)[0],
            "data": bytes(mem.view(data, count * SECTOR)).hex(),
            "interrupts": q.interrupts,
            "kicks": q.kicks,
        }


async def hold(card: CardServices, name: str, ready: str, release: str) -> str:
    """Claim ``name``, say so in file ``ready``, keep it until file ``release`` exists."""
    async with card.claim(name) as dev:
        await asyncio.to_thread(Path(ready).write_text, dev.holder)
        # the test process signals through a file (apps share no memory with it)
        while not await asyncio.to_thread(os.path.exists, release):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return "released"


async def try_claim(card: CardServices, name: str) -> str:
    try:
        async with card.claim(name):
            return "claimed?!"
    except DeviceBusyError as e:
        return str(e)


async def claim_and_raise(card: CardServices, name: str) -> None:
    """Drive the device halfway (a request in flight), then fail."""
    async with card.claim(name) as dev:
        await dev.negotiate(Feature.VERSION_1)
        (q,) = await dev.setup_queues()
        await dev.driver_ok()
        hdr, data, st = dev.alloc(REQ_HEADER_SIZE), dev.alloc(SECTOR), dev.alloc(1)
        dev.memory.view(hdr, REQ_HEADER_SIZE, True)[:] = REQ_HEADER.pack(BlkReqType.IN, 0)
        q.ring.add([(hdr, REQ_HEADER_SIZE)], [(data, SECTOR), (st, 1)], "r")
        q.publish()
        raise ValueError("driver bug while holding vda")


async def claim_cancelled(card: CardServices, name: str) -> list[Any]:
    """A claim left by cancellation: the device comes back with its default driver."""
    claimed = asyncio.Event()

    async def holder() -> None:
        async with card.claim(name, holder="a cancelled task"):
            claimed.set()
            await asyncio.sleep(3600)

    task = asyncio.get_running_loop().create_task(holder())
    await claimed.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    d = {d["name"]: d for d in card.devices()}[name]
    return [d["state"], d["driver"], d["holder"]]


async def unbind(card: CardServices, name: str) -> dict[str, Any]:
    """Unbind with a reader holding the old driver: it fails, the device is unbound."""
    old = _blk(card, name)
    await old.read(0, 1)
    await card.unbind(name)
    out: dict[str, Any] = {}
    try:
        await old.read(0, 1)
    except BrokenResourceError as e:
        out["old_driver"] = type(e).__name__
    try:
        card.device(name)
    except ClosedResourceError as e:
        out["device"] = str(e)
    d = {d["name"]: d for d in card.devices()}[name]
    return out | {"state": d["state"], "driver": d["driver"], "status": d["status"]}


async def bind(card: CardServices, name: str, driver: str) -> str:
    blk = await card.bind(name, driver)
    return type(blk).__name__


async def write_read(card: CardServices, name: str, sector: int, data: str) -> str:
    blk = _blk(card, name)
    await blk.write(sector, bytes.fromhex(data))
    await blk.flush()
    return (await blk.read(sector, len(data) // (2 * SECTOR))).hex()


async def bad_binds(card: CardServices) -> list[str]:
    """Each refused bind's error, as ``Class: message``; the device keeps its driver."""
    out = []
    for name, drv in (("vda", "virtio-nope"), ("vda", "virtio-net"), ("vdz", "virtio-blk")):
        try:
            await card.bind(name, drv)
            out.append("bound?!")
        except MicError as e:
            out.append(f"{type(e).__name__}: {e}")
    try:
        await card.bind("vda", "virtio-blk")
    except DeviceBusyError as e:
        out.append(f"{type(e).__name__}: {e}")
    return out


class FailingDriver:
    """A driver whose constructor raises: its device must end up ``failed``."""

    FEATURES = 0

    def __init__(self, dev: Any) -> None:
        raise ValueError("boom in probe")

    def config_changed(self) -> None: ...

    def detach(self, exc: BrokenResourceError) -> None: ...


async def bind_failing(card: CardServices, name: str) -> str:
    await card.unbind(name)
    try:
        await card.bind(name, FailingDriver)
    except DriverProbeError as e:
        return str(e)
    return "bound?!"


async def claim_until_removed(card: CardServices, name: str, ready: str) -> str:
    """Hold ``name`` waiting for an interrupt until the host hot-removes it."""
    async with card.claim(name) as dev:
        await dev.negotiate(Feature.VERSION_1)
        (q,) = await dev.setup_queues()
        await dev.driver_ok()
        await asyncio.to_thread(Path(ready).write_text, "")
        try:
            while True:
                await q.wait_interrupt()
        except BrokenResourceError as e:
            return str(e)


async def unknown_raises(card: CardServices) -> None:
    await card.bind("vda", "virtio-nope")


# ---------------------------------------------------------------------- tests


async def test_raw_blk_driver_reads_the_image(env: tuple[CardClient, Path, bytes]) -> None:
    card, _, image = env
    r = (await card.run(app("raw_read"), "vda", 8))["value"]
    assert r["during"][0] == "claimed"
    assert re.fullmatch(HOLDER_RE.replace(":hold", ":raw_read"), r["during"][1])
    assert r["acked"] == r["offered"] & (Feature.VERSION_1 | Feature.EVENT_IDX)
    assert r["capacity"] == IMAGE_BYTES // SECTOR
    assert (r["token"], r["status"]) == ("read", BlkStatus.OK)
    assert r["length"] == 8 * SECTOR + 1
    assert bytes.fromhex(r["data"]) == image[: 8 * SECTOR]
    assert r["kicks"] >= 1
    # left the block: the default driver is back and serves I/O
    rows = await card.devices()
    assert (row(rows, "vda")["driver"], row(rows, "vda")["state"]) == ("virtio-blk", "live")
    got = (await card.run(app("read_blk"), "vda", 0, 2))["value"]
    assert bytes.fromhex(got) == image[: 2 * SECTOR]


async def test_claim_refused_while_held(env: tuple[CardClient, Path, bytes]) -> None:
    card, state, _ = env
    ready, release = state / "held", state / "release"
    holding = asyncio.create_task(card.run(app("hold"), "vda", str(ready), str(release)))
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert time.monotonic() < deadline, "claim not taken"
            assert not holding.done(), "the holder ended early"
            await asyncio.sleep(0.05)
        holder = ready.read_text()
        assert re.fullmatch(HOLDER_RE, holder), holder
        refusal = (await card.run(app("try_claim"), "vda"))["value"]
        assert refusal == f"vda is claimed by {holder}"
        # the host sees it: micctl devices (asks the card) and status (pushed)
        r = await micctl(state, "devices", "mic0")
        assert r.returncode == 0, r.stderr
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("vda"))
        assert f"claimed  claimed by {holder}" in line
        entry = await status_row(card, "vda", "claimed")
        assert (entry["state"], entry["holder"], entry["driver"]) == ("claimed", holder, None)
        # a bind while held names the holder too
        busy = f"DeviceBusyError: vda is claimed by {re.escape(holder)}"
        with pytest.raises(MicError, match=busy):
            await card.run(app("bind"), "vda", "virtio-blk")
    finally:
        release.write_text("")
        assert (await holding)["value"] == "released"
    entry = await status_row(card, "vda", "live")
    assert (entry["driver"], entry["holder"]) == ("virtio-blk", None)


async def test_app_raising_while_holding(env: tuple[CardClient, Path, bytes]) -> None:
    card, _, image = env
    with pytest.raises(MicError, match="ValueError: driver bug while holding vda"):
        await card.run(app("claim_and_raise"), "vda")
    rows = await card.devices()
    assert (row(rows, "vda")["driver"], row(rows, "vda")["state"]) == ("virtio-blk", "live")
    # the shell reads the whole device through the rebound driver
    out, err, status = await card.exec("sha256sum", "/dev/vda")
    assert status == 0, err
    assert out.decode().split()[0] == hashlib.sha256(image).hexdigest()
    # and leaving by cancellation does the same
    got = (await card.run(app("claim_cancelled"), "vda"))["value"]
    assert got == ["live", "virtio-blk", None]


async def test_unbind_bind_round_trip(env: tuple[CardClient, Path, bytes]) -> None:
    card, state, image = env
    r = (await card.run(app("unbind"), "vda"))["value"]
    assert r["old_driver"] == "BrokenResourceError"
    assert r["device"] == "vda has no driver bound (unbound)"
    assert (r["state"], r["driver"], r["status"]) == ("unbound", None, 0)
    # the host's backend saw the reset: virtio status 0 on its side too
    entry = await status_row(card, "vda", "unbound")
    assert (entry["state"], entry["driver"], entry["status"]) == ("unbound", None, 0)
    r2 = await micctl(state, "devices", "mic0", "--json")
    assert r2.returncode == 0, r2.stderr
    vda = row(json.loads(r2.stdout), "vda")
    assert (vda["name"], vda["type"], vda["state"], vda["driver"]) == (
        "disk", "block", "unbound", None
    )  # fmt: skip
    assert (await card.run(app("bind"), "vda", "virtio-blk"))["value"] == "BlockDevice"
    data = os.urandom(4 * SECTOR)
    got = (await card.run(app("write_read"), "vda", 16, data.hex()))["value"]
    assert bytes.fromhex(got) == data
    entry = await status_row(card, "vda", "live")
    assert entry["driver"] == "virtio-blk"
    with (state / "disk.img").open("rb") as f:
        f.seek(16 * SECTOR)
        assert f.read(len(data)) == data
    # put the image back as the other tests expect it
    restore = image[16 * SECTOR : 16 * SECTOR + len(data)].hex()
    await card.run(app("write_read"), "vda", 16, restore)


async def test_bind_unknown_or_wrong_driver(env: tuple[CardClient, Path, bytes]) -> None:
    card, _, _ = env
    errors = (await card.run(app("bad_binds")))["value"]
    assert errors[0].startswith(f"{UnknownDriverError.__name__}: cannot bind vda: ")
    assert "no driver 'virtio-nope'" in errors[0]
    assert "known drivers: virtio-net, virtio-blk, virtio-console" in errors[0]
    assert errors[1] == (
        "UnknownDriverError: cannot bind virtio-net to vda: virtio-net drives virtio-net "
        "devices (type 1), vda is virtio-blk (type 2)"
    )
    assert errors[2] == "LocalProtocolError: no device 'vdz'"
    assert errors[3] == (
        "DeviceBusyError: vda already has driver virtio-blk bound; unbind it first"
    )
    # the same through micctl run: a clear error, and the card keeps running
    with pytest.raises(MicError, match="UnknownDriverError: cannot bind vda: no driver"):
        await card.run(app("unknown_raises"))
    assert (await card.state()) == "online"
    rows = await card.devices()
    assert (row(rows, "vda")["driver"], row(rows, "vda")["state"]) == ("virtio-blk", "live")


async def test_probe_failure_marks_device_failed(env: tuple[CardClient, Path, bytes]) -> None:
    card, state, image = env
    msg = (await card.run(app("bind_failing"), "vda"))["value"]
    assert msg == (
        "binding test_binding.FailingDriver to vda failed: driver "
        "test_binding.FailingDriver raised ValueError: boom in probe"
    )
    rows = await card.devices()
    vda = row(rows, "vda")
    assert (vda["state"], vda["driver"]) == ("failed", None)
    assert vda["error"] == "driver test_binding.FailingDriver raised ValueError: boom in probe"
    entry = await status_row(card, "vda", "failed")
    assert entry["error"] == vda["error"]
    r = await micctl(state, "devices", "mic0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["DEVICE", "NAME", "TYPE", "DRIVER", "STATE", "ERROR"]
    vda_line = next(ln for ln in lines if ln.startswith("vda"))
    assert vda_line.split()[:4] == ["vda", "disk", "block", "-"]
    assert "failed  driver test_binding.FailingDriver raised ValueError: boom" in vda_line
    hvc = next(ln for ln in lines if ln.startswith("hvc0")).split()
    assert hvc[2:5] == ["console", "virtio-console", "live"]
    # the card and its other devices carry on: the shell answers on the console
    out, err, status = await card.exec("echo", "still", "here")
    assert (status, out) == (0, b"still here\n"), err
    assert (await card.state()) == "online"
    # and the device recovers with its own driver
    assert (await card.run(app("bind"), "vda", "virtio-blk"))["value"] == "BlockDevice"
    got = (await card.run(app("read_blk"), "vda", 0, 1))["value"]
    assert bytes.fromhex(got) == image[:SECTOR]


async def test_hot_remove_while_claimed(env: tuple[CardClient, Path, bytes]) -> None:
    card, state, image = env
    dev = await card.attach_block(state / "hot.img", size="1M", create=True)
    assert dev == "vdb"
    ready = state / "vdb-held"
    holding = asyncio.create_task(card.run(app("claim_until_removed"), "vdb", str(ready)))
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert time.monotonic() < deadline, "claim not taken"
        assert not holding.done(), "the holder ended early"
        await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await card.detach("vdb")
    msg = (await asyncio.wait_for(holding, 20))["value"]
    assert time.monotonic() - t0 < 10  # nothing waited for a timeout
    assert msg == "queue 0: vdb was removed"
    rows = await card.devices()
    assert {r["device"] for r in rows} == {"vda", "hvc0"}
    got = (await card.run(app("read_blk"), "vda", 0, 1))["value"]
    assert bytes.fromhex(got) == image[:SECTOR]


async def test_shutdown_while_claimed(env: tuple[CardClient, Path, bytes]) -> None:
    """Shutdown cancels the holder; the claim's release does not hold the card up."""
    card, state, image = env
    ready, release = state / "held2", state / "never"
    holding = asyncio.create_task(card.run(app("hold"), "vda", str(ready), str(release)))
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert time.monotonic() < deadline, "claim not taken"
        await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await card.shutdown(wait=True, timeout=30)
    assert time.monotonic() - t0 < 8
    st = await card.status()
    assert (st["state"], st["shutdown_status"]) == ("ready", "halted")
    with contextlib.suppress(MicError):
        await holding
    # a card that is not running: the host's devices, nothing from the card
    rows = await card.devices()
    assert [(r["device"], r["driver"], r["state"]) for r in rows] == [(None, None, None)] * 2
    assert {r["name"] for r in rows} == {"disk", "console0"}
    await card.boot(wait=True, timeout=60)
    got = (await card.run(app("read_blk"), "vda", 0, 1))["value"]
    assert bytes.fromhex(got) == image[:SECTOR]
