"""The block device as the card shell sees it: blkinfo, dd and sha256sum through
the agent (real mic-host / mic-card processes)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import mic_host

CONFIG = """
[[cards]]
name = "mic0"
boot_at_start = true
card_ram = "16M"
host_ram = "4M"

[[cards.devices]]
type = "console"

[[cards.devices]]
type = "block"
name = "disk"
options = { image = "{state_dir}/disk.img", size = "1M", create = true, serial = "MICVOP-0001" }
"""


@pytest.mark.asyncio
async def test_blkinfo_dd_and_sha256sum(state_dir: Path) -> None:
    async with mic_host.launch(state_dir, CONFIG) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=30)
        out, err, status = await card.exec("blkinfo", "/dev/vda")
        assert status == 0, err
        text = out.decode()
        assert "capacity:   2048 sectors (1048576 bytes)" in text
        assert "serial:     MICVOP-0001" in text
        assert "flush" in text

        _, err, status = await card.exec(
            "dd", "if=/dev/urandom", "of=/dev/vda", "bs=4096", "count=8", "conv=fsync"
        )
        assert status == 0, err
        assert b"8+0 records out" in err
        out, err, status = await card.exec("sha256sum", "/dev/vda")
        assert status == 0, err
        card_hash = out.decode().split()[0]

        _, err, status = await card.exec("blkinfo", "/dev/vdz")
        assert status == 1
        assert b"no such block device" in err
        await card.shutdown(wait=True)
    assert hashlib.sha256((state_dir / "disk.img").read_bytes()).hexdigest() == card_hash
