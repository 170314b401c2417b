"""A buggy or hostile card OS: garbage in a ring, in the device page, on the control
link. The host must confine the damage (DEVICE_NEEDS_RESET on that device, or
the card marked crashed) and keep serving: the daemon answers, the other
devices and cards keep working, and a reboot gives a clean card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mic_host.client import CardClient
from tests.integration.helpers import app, booted, card_toml, config, daemon, eventually
from virtio.errors import BrokenResourceError, RemoteProtocolError

NEEDS_RESET = 0x40


def _device(status: dict[str, Any], name: str) -> dict[str, Any]:
    (dev,) = [d for d in status["devices"] if d["device"] == name]
    return dev


def _stats(stats: dict[str, Any], name: str) -> dict[str, Any]:
    (dev,) = [d for d in stats["devices"] if d["device"] == name]
    return dev


async def _needs_reset(card: CardClient, name: str) -> bool:
    return bool(_device(await card.status(), name)["status"] & NEEDS_RESET)


@pytest.mark.asyncio
async def test_avail_index_jump_marks_only_that_device(state_dir: Path) -> None:
    async with daemon(state_dir, config(card_toml("mic0"), card_toml("mic1"))) as client:
        card = await booted(client, "mic0")
        other = await booted(client, "mic1")
        await card.run(app("write_text"), "vda", 0, "before")

        async with card.events(["device"]) as events:
            got = (await card.run(app("corrupt_avail"), "vda", 1000))["value"]
            assert got["new"] - got["old"] == 1000 > got["size"]
            await events.wait_for("device_needs_reset", timeout=5, name="disk")
        assert await _needs_reset(card, "vda")
        disk = _stats(await card.stats(), "vda")
        assert disk["errors"] >= 1
        assert "avail" in disk["last_error"]

        # the card, the daemon, the console and the other card are fine
        st = await card.status()
        assert st["state"] == "online"
        assert _device(st, "hvc0")["status"] == 15
        assert _stats(await card.stats(), "hvc0")["errors"] == 0
        assert (await card.run(app("console_write"), "console still works\n"))["value"] == 20
        log = state_dir / "mic0-console.log"
        await eventually(
            lambda: b"console still works" in log.read_bytes(), within=5, what="console output"
        )
        assert (await other.run(app("echo")))["value"]["card"] == "mic1"
        assert (await client.ping())["pid"]

        # the card's driver sees the reset request; I/O fails instead of hanging
        with pytest.raises(RemoteProtocolError, match="needs reset"):
            await card.run(app("read_text"), "vda", 0, 6)

        # the driver resets the device (vdev reset handshake) and it works again
        assert (await card.run(app("reset_device"), "vda"))["value"] == "live"
        assert _device(await card.status(), "vda")["status"] == 15
        assert (await card.run(app("read_text"), "vda", 0, 6))["value"] == "before"
        await card.run(app("write_text"), "vda", 1, "after")
        assert (await card.run(app("read_text"), "vda", 1, 5))["value"] == "after"


@pytest.mark.parametrize(
    ("corrupt", "args", "needs_reset"),
    [
        pytest.param("corrupt_status", ["vda", 0x33], True, id="status-bits-cleared"),
        pytest.param("corrupt_status", ["vda", 0xFF], False, id="status-all-ones"),
        pytest.param("corrupt_used_address", ["vda"], True, id="used-ring-moved-after-ok"),
        pytest.param("corrupt_entry", ["vda", 1], False, id="entry-garbage-1"),
        pytest.param("corrupt_entry", ["vda", 2], False, id="entry-garbage-2"),
        pytest.param("corrupt_page", [3], False, id="whole-page-garbage"),
    ],
)
@pytest.mark.asyncio
async def test_device_page_garbage(
    state_dir: Path, corrupt: str, args: list[Any], needs_reset: bool
) -> None:
    async with daemon(state_dir) as client:
        card = await booted(client)
        await card.run(app("write_text"), "vda", 2, "survives")
        async with card.events(["device"]) as events:
            await card.run(app(corrupt), *args)
            if needs_reset:
                await events.wait_for("device_needs_reset", timeout=5, name="disk")
        if needs_reset:
            assert await _needs_reset(card, "vda")
            assert _stats(await card.stats(), "vda")["errors"] >= 1
        # whatever the garbage, the host is up and the card still online
        for _ in range(5):
            st = await card.status()
            assert st["state"] == "online"
            await card.stats()
        if corrupt != "corrupt_page":  # the console's entry was not touched
            assert (await card.run(app("console_write"), "ok\n"))["value"] == 3
        assert (await client.ping())["pid"]

        # an orderly shutdown still works, and a reboot gives a clean device page
        await card.shutdown(wait=True, timeout=30)
        st = await card.status()
        assert (st["state"], st["shutdown_status"]) == ("ready", "halted")
        await card.boot(wait=True)
        assert _device(await card.status(), "vda")["status"] == 15
        assert (await card.run(app("read_text"), "vda", 2, 8))["value"] == "survives"


@pytest.mark.asyncio
async def test_garbage_link_messages(state_dir: Path) -> None:
    """Well-framed but meaningless messages: ignored or logged; nothing breaks."""
    garbage = [
        {"type": "online", "devices": [1, "x", None, {"offset": [1]}, {"offset": 24}]},
        {"type": "devices", "id": "x", "devices": {"not": "a list"}},
        {"type": "devices", "id": 10**6, "devices": [[], {"name": 5, "offset": "a"}]},
        {"type": "heartbeat", "uptime": "forever"},
        {"type": "run_result", "id": 999, "ok": True, "result": 1},
        {"type": "run_result", "id": [1], "ok": False},
        {"type": "shutdown_status", "status": "exploded"},
        {"type": "no such message"},
        {"no": "type at all"},
    ]
    async with daemon(state_dir) as client:
        card = await booted(client)
        assert (await card.run(app("link_send"), *garbage))["value"] == len(garbage)
        for _ in range(3):
            st = await card.status()
            assert st["state"] == "online"
            assert (await client.status())["cards"][0]["name"] == "mic0"
            await card.stats()
        assert (await card.run(app("devices")))["value"] == ["hvc0", "vda"]
        # the host learns the names again from the card and hot plug still works
        res = await card.attach("block", image=str(state_dir / "x.img"), size="1M", create=True)
        assert res["device"] == "vdb"
        assert [d["device"] for d in (await card.status())["devices"]] == ["hvc0", "vda", "vdb"]
        await card.detach("vdb")
        await card.shutdown(wait=True)
        assert (await card.status())["shutdown_status"] == "halted"


@pytest.mark.asyncio
async def test_broken_link_framing_crashes_only_that_card(state_dir: Path) -> None:
    async with daemon(state_dir, config(card_toml("mic0"), card_toml("mic1"))) as client:
        card = await booted(client, "mic0")
        other = await booted(client, "mic1")
        # a frame header announcing 4 GiB: the host drops the link, the card is crashed
        with pytest.raises(BrokenResourceError):
            await card.run(app("link_garbage"), "ffffffff00")
        await card.wait("crashed", timeout=5)
        st = await card.status()
        assert st["shutdown_status"] == "crashed"
        assert (await other.status())["state"] == "online"
        assert (await other.run(app("echo")))["value"]["card"] == "mic1"
        await card.boot(wait=True)
        assert (await card.run(app("echo")))["value"]["card"] == "mic0"
