"""Config values that used to load and fail only at boot are refused at load, by a real
``mic-host`` (exit status 2, one line naming the file and the key), and at attach, by a
real daemon (the reply names the option); images the daemon creates are 0600.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.integration.helpers import (
    block_toml,
    booted,
    card_toml,
    config,
    daemon,
    mic_host_cmd,
)
from virtio.errors import MicError


def _cases(tmp: Path) -> list[tuple[str, str, str]]:
    """``(config text, key, problem)`` for each value of issue 14 item 9."""
    fifo = tmp / "fifo.img"
    os.mkfifo(fifo)
    empty = tmp / "empty.img"
    empty.touch()
    img = str(tmp / "d.img")
    opt = "cards[0].devices[1].options"  # the disk, after the console

    def disk(image: str = img, **options: object) -> str:
        return config(card_toml(disk=None) + block_toml(image, **options))

    many = "".join(block_toml(f"{tmp}/{i}.img") for i in range(60))
    return [
        (disk(num_queues=99), f"{opt}.num_queues", "1..4"),
        (disk(queue_size=3), f"{opt}.queue_size", "power of two"),
        (disk(blk_size=1000), f"{opt}.blk_size", "power of two"),
        (config(card_toml(host_ram=4096)), "cards[0].host_ram", "cannot hold"),
        (config(card_toml(card_ram="1T")), "cards[0].card_ram", "host RAM window"),
        (config(card_toml(disk=None) + many), "cards[0].devices[", "the device page is full"),
        (disk("/dev/zero"), f"{opt}.image", "/dev/zero is a character device"),
        (disk("/dev/null"), f"{opt}.image", "/dev/null is a character device"),
        (disk(str(fifo)), f"{opt}.image", "is a FIFO"),
        (disk(str(empty)), f"{opt}.image", "is empty"),
    ]


@pytest.mark.asyncio
async def test_mic_host_refuses_out_of_bounds_config_at_load(state_dir: Path) -> None:
    for text, key, problem in _cases(state_dir):
        path = state_dir / "host.toml"
        path.write_text(text)
        r = await mic_host_cmd("--state-dir", str(state_dir), "--config", str(path))
        assert r.rc == 2, r
        (line,) = r.err.splitlines()
        assert line.startswith(f"mic-host: {path}: {key}"), line
        assert problem in line, line
        assert not (state_dir / "control.sock").exists()


@pytest.mark.asyncio
async def test_attach_checks_the_same_bounds_and_creates_0600_images(state_dir: Path) -> None:
    old = os.umask(0)  # explicit modes make the image private whatever the umask
    try:
        async with daemon(state_dir, config(card_toml())) as client:
            card = await booted(client)
            assert stat.S_IMODE((state_dir / "mic0.img").stat().st_mode) == 0o600
            for options, fragment in [
                ({"image": "/dev/zero"}, "options.image: /dev/zero is a character device"),
                ({"image": "x.img", "size": "1M", "create": True, "queue_size": 3}, "queue_size"),
                ({"image": "x.img", "size": "1M", "create": True, "num_queues": 9}, "num_queues"),
                ({"image": "x.img", "size": "1000", "create": True}, "whole number of 512-byte"),
            ]:
                with pytest.raises(MicError, match="attach: ") as ei:
                    await card.attach("block", **options)
                assert fragment in str(ei.value), ei.value
            assert not (state_dir / "x.img").exists()
            name = await card.attach_block(state_dir / "hot.img", size="1M", create=True)
            assert name == "vdb"
            assert stat.S_IMODE((state_dir / "hot.img").stat().st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.mark.asyncio
async def test_hot_attach_beyond_the_device_page_says_so(state_dir: Path) -> None:
    async with daemon(state_dir, config(card_toml(host_ram="8M"))) as client:
        card = await booted(client)
        refused: MicError | None = None
        added = 0
        while refused is None and added < 40:
            try:
                await card.attach_block(state_dir / f"h{added}.img", size="64K", create=True)
            except MicError as e:
                refused = e
            else:
                added += 1
        assert 20 < added < 40, added
        assert "device page" in str(refused), refused
        # the card still works and the refused device left nothing behind
        assert (await card.status())["state"] == "online"


@pytest.mark.asyncio
async def test_attach_to_a_card_that_is_down_checks_the_device_page_now(state_dir: Path) -> None:
    """A card that is not running still refuses a device its page cannot hold:
    at attach, naming the device, not at the next boot."""
    async with daemon(state_dir, config(card_toml(host_ram="8M"))) as client:
        card = client.card("mic0")
        assert (await card.status())["state"] == "ready"
        refused: MicError | None = None
        added = 0
        while refused is None and added < 40:
            try:
                await card.attach_block(state_dir / f"d{added}.img", size="64K", create=True)
            except MicError as e:
                refused = e
            else:
                added += 1
        assert 20 < added < 40, added
        assert "the device page is full" in str(refused), refused
        assert f"devices[{added + 2}]" in str(refused), refused  # console + vda come first
        await card.boot(wait=True)  # every device it kept fits: the card boots
        assert (await card.status())["state"] == "online"
