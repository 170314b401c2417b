"""The packed ring between real processes: a ``mic-host`` daemon and ``mic-card``
card OS processes, devices configured with ``ring = "packed"``.

One daemon boots two cards on one switch: ``mic0`` runs its console, disk
and NIC on packed rings, ``mic1`` its NIC on the default split ring, so a
packed card and a split card exchange frames. A hostile card that breaks a
packed ring gets DEVICE_NEEDS_RESET on that device only, as with a split
ring, and a vdev reset brings the device back.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import HEARTBEAT, app, booted, daemon, eventually, micctl

PACKED = "tests.integration.packed_apps"
NET = "tests.net.apps"
NEEDS_RESET = 0x40


def papp(fn: str) -> str:
    return f"{PACKED}:{fn}"


def napp(fn: str) -> str:
    return f"{NET}:{fn}"


def _card(name: str, switch: str, ring: str, *, disk: bool) -> str:
    ring_opt = f'ring = "{ring}"'
    text = f'[[cards]]\nname = "{name}"\ncard_ram = "32M"\nhost_ram = "4M"\n'
    text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in HEARTBEAT.items())
    text += f'[[cards.devices]]\ntype = "console"\noptions = {{ {ring_opt} }}\n'
    if disk:
        text += (
            '[[cards.devices]]\ntype = "block"\nname = "disk"\n'
            'options = { image = "{state_dir}/{card}.img", size = "1M", create = true, '
            f"{ring_opt} }}\n"
        )
    net = f'backend = "switch", switch = "{switch}", card_mode = "frames", {ring_opt}'
    text += f'[[cards.devices]]\ntype = "net"\nname = "net0"\noptions = {{ {net} }}\n'
    return text


def _dev(stats: dict[str, Any], name: str) -> dict[str, Any]:
    (dev,) = [d for d in stats["devices"] if d["device"] == name]
    return dev


@pytest.mark.asyncio
async def test_packed_block_console_net_and_hot_attach(state_dir: Path) -> None:
    sw = f"sw{uuid.uuid4().hex[:6]}"
    cfg = "version = 1\n\n" + _card("mic0", sw, "packed", disk=True)
    cfg += "\n" + _card("mic1", sw, "split", disk=False)
    async with daemon(state_dir, cfg) as client:
        card, other = await booted(client, "mic0"), await booted(client, "mic1")
        stats = await card.stats()
        for name in ("hvc0", "vda", "eth0"):
            assert _dev(stats, name)["ring"] == "packed", name
            assert (await card.run(papp("ring_of"), name))["value"] == {
                "ring": "packed",
                "used_in_card": False,  # the card's default moves split used rings only
            }
        assert _dev(await other.stats(), "eth0")["ring"] == "split"
        assert (await other.run(papp("ring_of"), "eth0"))["value"]["ring"] == "split"

        # block: written on the card, checked in the image on the host
        await card.run(app("write_text"), "vda", 3, "packed ring")
        assert (await card.run(app("read_text"), "vda", 3, 11))["value"] == "packed ring"
        image = (state_dir / "mic0.img").read_bytes()
        assert image[3 * 512 : 3 * 512 + 11] == b"packed ring"
        # console: the card's output reaches the host's log
        assert (await card.run(app("console_write"), "over a packed ring\n"))["value"] == 19
        log = state_dir / "mic0-console.log"
        await eventually(
            lambda: b"over a packed ring" in log.read_bytes(), within=10, what="console output"
        )
        # net: frames both ways between the packed card and the split card
        mac0 = (await card.run(napp("mac_of")))["value"]
        mac1 = (await other.run(napp("mac_of")))["value"]
        for src, dst, mac in ((card, other, mac1), (other, card, mac0)):
            recv = asyncio.create_task(dst.run(napp("recv_frames"), 40, 15.0))
            await asyncio.sleep(0.3)
            await src.run(napp("send_frames"), mac, 40, "pk")
            assert (await recv)["value"] == [f"pk {i}" for i in range(40)]

        # hot attach with micctl --ring packed
        r = await micctl(
            state_dir, "attach", "mic0", "block", "--image", str(state_dir / "hot.img"),
            "--size", "1M", "--create", "--ring", "packed",
        )  # fmt: skip
        assert r.rc == 0, r.err
        assert _dev(await card.stats(), "vdb")["ring"] == "packed"
        await card.run(app("write_text"), "vdb", 0, "hot")
        assert (state_dir / "hot.img").read_bytes()[:3] == b"hot"
        bad = await micctl(
            state_dir, "attach", "mic0", "console", "--opt", "ring=circular"
        )  # fmt: skip
        assert bad.rc != 0
        assert "ring: expected one of split, packed, got 'circular'" in bad.err


@pytest.mark.asyncio
async def test_hostile_card_breaks_a_packed_ring(state_dir: Path) -> None:
    sw = f"sw{uuid.uuid4().hex[:6]}"
    async with daemon(
        state_dir, "version = 1\n\n" + _card("mic0", sw, "packed", disk=True)
    ) as client:
        card = await booted(client)
        await card.run(app("write_text"), "vda", 0, "before")
        async with card.events(["device"]) as events:
            await card.run(papp("corrupt_packed"), "vda")
            await events.wait_for("device_needs_reset", timeout=10, name="disk")
        st = await card.status()
        (vda,) = [d for d in st["devices"] if d["device"] == "vda"]
        assert vda["status"] & NEEDS_RESET
        disk = _dev(await card.stats(), "vda")
        assert disk["errors"] >= 1
        assert "buffer id" in disk["last_error"]
        # the card, the daemon and the other devices are fine
        assert st["state"] == "online"
        assert (await card.run(app("console_write"), "still here\n"))["value"] == 11
        assert _dev(await card.stats(), "hvc0")["errors"] == 0
        assert (await client.ping())["pid"]
        # the driver resets the device and it works again, on a packed ring
        assert (await card.run(app("reset_device"), "vda"))["value"] == "live"
        assert (await card.run(app("read_text"), "vda", 0, 6))["value"] == "before"
        assert (await card.run(papp("ring_of"), "vda"))["value"]["ring"] == "packed"
