"""Devices through real processes: two cards with their own disks, hot add and hot
remove of a block device on an online card, data reaching the backing images.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.integration.helpers import alive, app, booted, card_toml, config, daemon
from virtio.errors import MicError, RemoteProtocolError


@pytest.mark.asyncio
async def test_two_cards_at_once(state_dir: Path) -> None:
    async with daemon(state_dir, config(card_toml("mic0"), card_toml("mic1"))) as client:
        mic0 = await booted(client, "mic0")
        mic1 = await booted(client, "mic1")
        st = {c["name"]: c for c in (await client.status())["cards"]}
        assert st["mic0"]["state"] == st["mic1"]["state"] == "online"
        assert st["mic0"]["pid"] != st["mic1"]["pid"]
        assert (st["mic0"]["node_id"], st["mic1"]["node_id"]) == (1, 2)

        # each card's vda is its own image
        await mic0.run(app("write_text"), "vda", 0, "I am mic0")
        await mic1.run(app("write_text"), "vda", 0, "I am mic1")
        assert (await mic0.run(app("read_text"), "vda", 0, 64))["value"] == "I am mic0"
        assert (await mic1.run(app("read_text"), "vda", 0, 64))["value"] == "I am mic1"
        assert (state_dir / "mic0.img").read_bytes()[:9] == b"I am mic0"
        assert (state_dir / "mic1.img").read_bytes()[:9] == b"I am mic1"
        # an app sees its own card
        assert (await mic1.run(app("echo")))["value"]["card"] == "mic1"

        # killing one leaves the other online and working
        pid1 = st["mic1"]["pid"]
        os.kill(pid1, signal.SIGKILL)
        await mic1.wait("crashed", timeout=5)
        st0 = await mic0.status()
        assert (st0["state"], st0["pid"]) == ("online", st["mic0"]["pid"])
        assert (await mic0.run(app("read_text"), "vda", 0, 64))["value"] == "I am mic0"
        assert alive(st0["pid"])

        # and so does shutting one down
        await mic1.boot(wait=True)
        await mic0.shutdown(wait=True)
        assert (await mic1.run(app("read_text"), "vda", 0, 64))["value"] == "I am mic1"


@pytest.mark.asyncio
async def test_hot_add_and_remove(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        card = await booted(client)
        image = state_dir / "hot.img"
        res = await card.attach("block", image=str(image), size="1M", create=True, name="hot")
        assert (res["device"], res["name"], res["type"]) == ("vdb", "hot", "block")
        assert image.stat().st_size == 1 << 20

        st = await card.status()
        assert [(d["device"], d["name"]) for d in st["devices"]] == [
            ("hvc0", "console0"),
            ("vda", "disk"),
            ("vdb", "hot"),
        ]
        assert st["devices"][2]["status"] == 15  # ACK|DRIVER|FEATURES_OK|DRIVER_OK
        assert (await card.run(app("devices")))["value"] == ["hvc0", "vda", "vdb"]
        assert (await card.run(app("capacity"), "vdb"))["value"] == 2048
        await card.run(app("write_text"), "vdb", 7, "hot data")
        assert (await card.run(app("read_text"), "vdb", 7, 8))["value"] == "hot data"
        assert image.read_bytes()[7 * 512 : 7 * 512 + 8] == b"hot data"
        stats = await card.stats()
        assert [d["device"] for d in stats["devices"]] == ["hvc0", "vda", "vdb"]

        # the existing disk is untouched by the hot add
        await card.run(app("write_text"), "vda", 0, "cold data")
        assert (await card.run(app("read_text"), "vda", 0, 9))["value"] == "cold data"

        assert (await card.detach("vdb"))["removed"] == "hot"
        assert (await card.run(app("devices")))["value"] == ["hvc0", "vda"]
        with pytest.raises(RemoteProtocolError, match="no device 'vdb'"):
            await card.run(app("read_text"), "vdb", 7, 8)
        st = await card.status()
        assert [d["device"] for d in st["devices"]] == ["hvc0", "vda"]
        assert [d["device"] for d in (await card.stats())["devices"]] == ["hvc0", "vda"]
        assert image.read_bytes()[7 * 512 : 7 * 512 + 8] == b"hot data"  # image kept
        with pytest.raises(MicError, match="no device 'vdb'"):
            await card.detach("vdb")

        # attach again (by label this time for the detach): the slot is reused
        res = await card.attach("block", image=str(image))
        assert res["device"] == "vdb"
        assert (await card.run(app("read_text"), "vdb", 7, 8))["value"] == "hot data"
        await card.detach(res["name"])
        assert (await card.run(app("devices")))["value"] == ["hvc0", "vda"]
        assert (await card.run(app("read_text"), "vda", 0, 9))["value"] == "cold data"


@pytest.mark.asyncio
async def test_attached_device_survives_reboot(state_dir: Path) -> None:
    """A device attached at run time stays in the card's config: after a reboot
    (and an attach while the card is down) the card sees them from boot.
    """
    async with daemon(state_dir, config(card_toml(disk=None))) as client:
        card = await booted(client)
        assert (await card.run(app("devices")))["value"] == ["hvc0"]
        res = await card.attach("block", image=str(state_dir / "a.img"), size="1M", create=True)
        assert res["device"] == "vda"
        await card.run(app("write_text"), "vda", 1, "kept")
        await card.shutdown(wait=True)

        res = await card.attach("block", image=str(state_dir / "b.img"), size="2M", create=True)
        assert res["device"] is None  # the card is down: named at its next boot
        await card.boot(wait=True)
        assert (await card.run(app("devices")))["value"] == ["hvc0", "vda", "vdb"]
        assert (await card.run(app("read_text"), "vda", 1, 4))["value"] == "kept"
        assert (await card.run(app("capacity"), "vdb"))["value"] == 4096
        assert [d["device"] for d in (await card.status())["devices"]] == ["hvc0", "vda", "vdb"]


@pytest.mark.asyncio
async def test_hot_add_read_only(state_dir: Path) -> None:
    image = state_dir / "ro.img"
    image.write_bytes(b"read me".ljust(1 << 20, b"\0"))
    async with daemon(state_dir) as client:
        card = await booted(client)
        res = await card.attach("block", image=str(image), read_only=True, serial="RO-1")
        assert res["device"] == "vdb"
        assert (await card.run(app("read_text"), "vdb", 0, 7))["value"] == "read me"
        with pytest.raises(RemoteProtocolError, match=r"BlockIOError: vdb: write .* IOERR"):
            await card.run(app("write_text"), "vdb", 0, "overwritten")
        assert image.read_bytes()[:7] == b"read me"
        assert (await card.run(app("devices")))["value"] == ["hvc0", "vda", "vdb"]
