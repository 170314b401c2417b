"""mic_host.config bounds: every value with a known bound is refused at load (and at
attach) with the key that holds it, not found out at boot (issue 14 item 9), and the
config's arithmetic is VOP's and the backends'."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mic_host.config import (
    CardConfig,
    DeviceConfig,
    check_card_devices,
    validate_device_options,
)
from tests.host.test_config import BLOCK, SD, card, expect, parse
from virtio.errors import ConfigError

# ------------------------------------------------ refused at load, not at boot


def _value(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else str(v)


def _disk(image: str = "d.img", **options: object) -> str:
    extra = "".join(f", {k} = {_value(v)}" for k, v in options.items())
    return BLOCK + f'options = {{ image = "{image}", size = "1M", create = true{extra} }}\n'


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (card(devices=_disk(num_queues=99)), ("options.num_queues: 99 queues: expected 1..4",)),
        (card(devices=_disk(num_queues=0)), ("options.num_queues: must be positive",)),
        (card(devices=_disk(queue_size=3)), ("options.queue_size: 3 entries", "power of two")),
        (card(devices=_disk(queue_size=512)), ("options.queue_size: 512", "4..256")),
        (card(devices=_disk(queue_size=2)), ("options.queue_size: 2", "4..256")),
        (card(devices=_disk(blk_size=1000)), ("options.blk_size: 1000 B", "power of two")),
        (card(devices=_disk(blk_size=256)), ("options.blk_size: 256 B", "512..65536")),
        (card(devices=_disk(blk_size="128K")), ("options.blk_size: 131072 B",)),
        (
            card(devices=_disk(blk_size="4K").replace('"1M"', "6144")),
            ("options.size: 6144 B is not a whole number of 4096-byte blocks",),
        ),
        (
            card(devices=_disk().replace('"1M"', '"9000000T"')),
            ("cards[0].devices[0].options.size:", "more than any file can hold"),
        ),
        (card("host_ram = 4096", _disk()), ("cards[0].host_ram: 4K cannot hold", "at least 12K")),
        (card('host_ram = "1T"'), ("cards[0].host_ram: 1T is more than the SMPT maps", "512G")),
        (
            card('card_ram = "1T"'),
            ("cards[0].card_ram: 1T would reach the host RAM window", "0x8000000000", "512G"),
        ),
        (card('card_ram = "64K"'), ("cards[0].card_ram: 64K is below", "1M")),
        (
            card(devices=_disk() * 60),
            ("cards[0].devices[31]: the device page is full", "devices[0..30] take 3968 of"),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 'console'\n" * 60),
            ("cards[0].devices[20]: the device page is full", "console device needs 200 B"),
        ),
        (card(devices=_disk("/dev/zero")), ("options.image: /dev/zero is a character device",)),
        (card(devices=_disk("/dev/null")), ("options.image: /dev/null is a character device",)),
        (card(devices=_disk("/")), ("options.image: / is a directory",)),
    ],
)
def test_out_of_bounds_values_are_refused_at_load(text: str, fragments: tuple[str, ...]) -> None:
    expect(text, *fragments)


def test_largest_values_that_boot_are_accepted() -> None:
    devices = _disk(num_queues=4, queue_size=256, blk_size="64K").replace('"1M"', '"64K"')
    (c,) = parse(card('card_ram = "512G"\nhost_ram = "512G"', devices * 20)).cards
    assert (c.card_ram, c.host_ram) == (512 << 30, 512 << 30)
    assert len(c.devices) == 20  # 200 B entries: 20 fill the 4072 B of the device page
    opts = c.devices[0].options
    assert (opts["num_queues"], opts["queue_size"], opts["blk_size"]) == (4, 256, 64 << 10)
    # 100T sparse is a legal size (xfs, btrfs, tmpfs hold it); ext4 refuses it when
    # the image is created, with the file system's error (see test_backend)
    (c,) = parse(card(devices=_disk().replace('"1M"', '"100T"'))).cards
    assert c.devices[0].options["size"] == 100 << 40


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "empty.img").touch()
    (tmp_path / "tiny.img").write_bytes(b"x" * 100)
    (tmp_path / "k4.img").write_bytes(bytes(4096))
    return {
        "fifo": fifo,
        "empty": tmp_path / "empty.img",
        "tiny": tmp_path / "tiny.img",
        "k4": tmp_path / "k4.img",
    }


@pytest.mark.parametrize(
    ("which", "options", "problem"),
    [
        ("fifo", {}, "is a FIFO: an image must be a regular file or a block device"),
        ("empty", {}, "is empty: an image must hold at least one 512-byte block"),
        ("empty", {"create": True, "size": "1M"}, "is empty"),  # create makes only missing ones
        ("tiny", {}, "holds 100 B, less than one 512-byte block"),
        ("k4", {"blk_size": "8K"}, "holds 4096 B, less than one 8192-byte block"),
    ],
)
def test_images_that_make_no_disk_are_refused(
    images: dict[str, Path], which: str, options: dict[str, object], problem: str
) -> None:
    path = images[which]
    text = card(devices=BLOCK + f"options = {{ image = '{path}' }}\n")
    if options:
        text = card(devices=_disk(str(path), **options).replace(', size = "1M", create = true', ""))
    msg = expect(text, f"cards[0].devices[0].options.image: {path} ")
    assert problem in msg
    # attach runs the same checks (micctl attach and the control attach op)
    with pytest.raises(ConfigError, match=rf"^attach: options.image: {path} ") as ei:
        validate_device_options("block", {"image": str(path), **options}, state_dir=SD, card="mic0")
    assert problem in str(ei.value)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"image": "a", "num_queues": 99}, r"^attach: options.num_queues: 99 queues"),
        ({"image": "a", "queue_size": 3}, r"^attach: options.queue_size: 3 entries"),
        ({"image": "a", "blk_size": 1000}, r"^attach: options.blk_size: 1000 B"),
        ({"image": "a", "create": True, "size": 1000}, r"^attach: options.size: 1000 B is not"),
        ({"image": "/dev/zero"}, r"^attach: options.image: /dev/zero is a character device"),
    ],
)
def test_attach_options_are_bounded_like_the_file(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_device_options("block", options, state_dir=SD, card="mic0")


def test_a_regular_image_and_a_missing_one_load(images: dict[str, Path]) -> None:
    (c,) = parse(card(devices=BLOCK + f"options = {{ image = '{images['k4']}' }}\n")).cards
    assert c.devices[0].options["image"] == str(images["k4"])
    # missing without create: reported when the card boots (it may be made in between)
    (c,) = parse(card(devices=BLOCK + "options = { image = 'later.img' }\n")).cards
    assert c.devices[0].options["image"] == str(SD / "later.img")


def test_check_card_devices_for_a_hot_attach() -> None:
    c = CardConfig(name="mic0", host_ram=40 << 10)  # the page + 4 rings of 128 entries (8K)
    one = DeviceConfig("block", "d", {"image": "/x.img"})
    check_card_devices(c, [one] * 4)
    with pytest.raises(
        ConfigError, match=r"^attach: mic0.host_ram: 40K cannot hold .* 5 device\(s\): at least 44K"
    ):
        check_card_devices(c, [one] * 5)
    big = CardConfig(name="mic0", host_ram=16 << 20)
    check_card_devices(big, [one] * 31)
    with pytest.raises(ConfigError, match=r"^attach: mic0.devices\[31\]: the device page is full"):
        check_card_devices(big, [one] * 32)
    # a plug-in type counts as the smallest device: never refused for what it may need
    check_card_devices(big, [DeviceConfig("plugin-x", None, {})] * 60)
    with pytest.raises(ConfigError, match="device page is full"):
        check_card_devices(big, [DeviceConfig("plugin-x", None, {})] * 100)


# ------------------------------- the config's arithmetic is VOP's and the backends'


def test_limits_agree_with_vop_and_the_backends(tmp_path: Path) -> None:
    from mic_host.backends import block as be
    from mic_host.backends.console import CONSOLE_QUEUE_SIZE, ConsoleBackend
    from mic_host.backends.net.core import NET_QUEUE_SIZE
    from mic_host.config import limits
    from virtio.net import build_config as net_config

    assert limits.BLOCK_MAX_QUEUES == be.MAX_QUEUES
    assert limits.CONSOLE_QUEUE_SIZE == CONSOLE_QUEUE_SIZE
    assert limits.NET_QUEUE_SIZE == NET_QUEUE_SIZE
    image = tmp_path / "d.img"
    image.write_bytes(bytes(4096))
    for opts in ({}, {"num_queues": 3, "queue_size": 64}, {"num_queues": 4, "queue_size": 256}):
        b = be.BlockBackend(image, force_share=True, **opts)  # type: ignore[arg-type]
        g = limits.geometry("block", opts)
        assert g.queue_sizes == tuple(b.queue_sizes())
        assert g.config_len == len(b.config_bytes())
    c = ConsoleBackend()
    g = limits.geometry("console", {})
    assert (g.queue_sizes, g.config_len) == (tuple(c.queue_sizes()), len(c.config_bytes()))
    g = limits.geometry("net", {})
    assert (g.queue_sizes, g.config_len) == ((NET_QUEUE_SIZE,) * 2, len(net_config(bytes(6))))


class _Platform:
    """Just enough of ``HostPlatform`` for ``Vop.add_device``."""

    def __init__(self, host_ram: int) -> None:
        self.host_ram = memoryview(bytearray(host_ram))
        self.host_ram_bus = 0x80_0000_0000
        self.card_view = None

    def ring_card(self, db: int) -> None:
        pass


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "kinds",
    [["block"] * 40, ["console"] * 30, ["console", "block", "block4"] * 12],
)
async def test_what_load_accepts_a_real_vop_accepts(tmp_path: Path, kinds: list[str]) -> None:
    """The device that the config says does not fit is the one VOP refuses, and the
    host RAM the config asks for is exactly what VOP needs for the rest."""
    from mic_host.backends.block import BlockBackend
    from mic_host.backends.console import ConsoleBackend
    from mic_host.config.limits import card_problem, geometry, min_host_ram
    from mic_host.vop import Vop
    from virtio.errors import ResourceError

    image = tmp_path / "d.img"
    image.write_bytes(bytes(4096))
    specs = [
        ("console", {}) if k == "console" else ("block", {"num_queues": 4} if k == "block4" else {})
        for k in kinds
    ]
    bad = card_problem(64 << 20, 1 << 30, specs)
    assert bad is not None
    assert bad[1].startswith("the device page is full")
    fit = int(bad[0][len("devices[") : -1])
    host_ram = min_host_ram([geometry(t, o) for t, o in specs[:fit]])
    assert card_problem(64 << 20, host_ram, specs[:fit]) is None
    assert card_problem(64 << 20, host_ram - 4096, specs[:fit]) is not None

    def backend(i: int) -> Any:
        t, o = specs[i]
        if t == "console":
            return ConsoleBackend(name=f"d{i}")
        return BlockBackend(image, name=f"d{i}", force_share=True, **o)  # one image, many

    async with Vop(_Platform(host_ram)) as vop:  # type: ignore[arg-type]
        for i in range(fit):
            vop.add_device(backend(i))
    async with Vop(_Platform(16 << 20)) as vop:  # type: ignore[arg-type]
        for i in range(fit):
            vop.add_device(backend(i))
        with pytest.raises(ResourceError, match="device page full"):
            vop.add_device(backend(fit))
    async with Vop(_Platform(host_ram - 4096)) as vop:  # type: ignore[arg-type]
        for i in range(fit - 1):
            vop.add_device(backend(i))
        with pytest.raises(ResourceError, match="host RAM exhausted"):
            vop.add_device(backend(fit - 1))
