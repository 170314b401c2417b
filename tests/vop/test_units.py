"""Unit tests: allocators, device-page slots, the backend registry, the ring info block."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from mic_card.bus import CardRamAllocator
from mic_host.backends import (
    Backend,
    BackendContext,
    available_backends,
    create_backend,
    register_backend,
)
from mic_host.backends.block import BlockBackend
from mic_host.backends.console import ConsoleBackend
from mic_host.vop import DevicePage, HostRamAllocator, vring_alloc_size, vring_info_offset
from tests.vop.rig import Rig
from virtio.constants import MIC_MAGIC, DeviceType
from virtio.devpage import Ctrl
from virtio.errors import ConfigError, LocalProtocolError, ResourceError
from virtio.layouts import DeviceEntry, VqConfig, entry_size, iter_device_page


def _entry(dtype: int, num_vq: int, config_len: int) -> DeviceEntry:
    return DeviceEntry(
        type=dtype,
        num_vq=num_vq,
        feature_len=8,
        config_len=config_len,
        vqconfigs=tuple(VqConfig(0x1000 * (i + 1), 0, 64) for i in range(num_vq)),
        config=bytes(range(config_len)),
        host_features=1 << 32,
    )


def test_host_ram_allocator() -> None:
    a = HostRamAllocator(4096, 64 * 4096)
    x = a.alloc(5000)
    y = a.alloc(4096)
    assert x == 4096
    assert y == 3 * 4096
    a.free(x)
    assert a.alloc(100) == 4096  # first fit reuses the hole
    with pytest.raises(ResourceError):
        a.alloc(1 << 30)
    with pytest.raises(LocalProtocolError):
        a.free(12345)
    a.free(4096)
    a.free(y)
    assert a.free_bytes == 63 * 4096
    assert a.alloc(63 * 4096) == 4096  # merged back into one block


def test_card_ram_allocator() -> None:
    a = CardRamAllocator(0x1000, 0x1000 + 0x10000)
    x = a.alloc(10, 4096)
    assert x % 4096 == 0
    y = a.alloc(100, 64)
    assert y % 64 == 0
    assert y != x
    a.free(x)
    a.free(y)
    assert a.free_bytes == 0x10000
    with pytest.raises(ResourceError):
        a.alloc(0x20000)
    with pytest.raises(LocalProtocolError):
        a.alloc(10, 3)


def test_vring_info_placement() -> None:
    # Linux: info = va + round_up(vring_size(num, 4096), 4); alloc = PAGE_ALIGN(that + 8)
    assert vring_info_offset(128) == (4096 + 6 + 8 * 128 + 3) & ~3 == 5128
    assert vring_alloc_size(128) == 8192
    assert vring_alloc_size(256) == 3 * 4096


def test_device_page_publish_remove_and_reuse() -> None:
    page = DevicePage(memoryview(bytearray(4096)))
    big = page.add(_entry(2, 2, 60))
    small_next = page.add(_entry(3, 1, 12))
    assert big.device_type == 2
    assert small_next.offset == big.offset + big.size
    page.remove(big)
    assert [e.removed for _, e in iter_device_page(page.raw)] == [True, False]
    # a smaller entry reuses the removed slot; the rest becomes a removed filler
    small = page.add(_entry(3, 1, 12))
    assert small.offset == big.offset
    walk = [(o, e.type) for o, e in iter_device_page(page.raw)]
    assert walk[0] == (big.offset, 3)
    assert walk[1] == (big.offset + small.size, -1)
    assert walk[2] == (small_next.offset, 3)
    # an entry that does not fit the filler goes to the end
    third = page.add(_entry(2, 2, 60))
    assert third.offset > small_next.offset
    assert [e.type for _, e in iter_device_page(page.raw)] == [3, -1, 3, 2]


def test_device_page_validation() -> None:
    page = DevicePage(memoryview(bytearray(4096)))
    with pytest.raises(LocalProtocolError):
        page.add(
            DeviceEntry(
                type=2, num_vq=1, feature_len=4, config_len=0, vqconfigs=((0, 0, 8),), config=b""
            )
        )
    bad_size = DeviceEntry(
        type=2, num_vq=1, feature_len=8, config_len=0, vqconfigs=((0, 0, 100),), config=b""
    )
    with pytest.raises(LocalProtocolError):
        page.add(bad_size)
    with pytest.raises(LocalProtocolError):
        page.add(
            DeviceEntry(
                type=0, num_vq=1, feature_len=8, config_len=0, vqconfigs=((0, 0, 8),), config=b""
            )
        )
    fits = (4096 - 24) // entry_size(8, 8, 0)
    for _ in range(fits):
        page.add(_entry(2, 8, 0))
    with pytest.raises(ResourceError):
        page.add(_entry(2, 8, 0))


def test_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mic_host.backends as backends

    monkeypatch.setattr(backends, "_registry", {})  # no leaks between tests
    assert {"block", "console"} <= set(available_backends())
    img = tmp_path / "x.img"
    b = create_backend("block", path=img, create=True, size=4096, name="x")
    assert isinstance(b, BlockBackend)
    assert b.capacity == 8
    assert isinstance(create_backend("console", name="c"), ConsoleBackend)
    with pytest.raises(ConfigError, match="unknown backend"):
        create_backend("nope")
    with pytest.raises(ConfigError, match="bad options"):
        create_backend("console", colour="red")
    with pytest.raises(ConfigError):
        create_backend("block", path=tmp_path / "missing.img")
    with pytest.raises(ConfigError):
        create_backend("block", path=tmp_path / "y.img", create=True, size=100)

    class Null:
        device_type = 42
        name = "null"

        def features(self) -> int:
            return 0

        def config_bytes(self) -> bytes:
            return b""

        def queue_sizes(self) -> Sequence[int]:
            return (8,)

        async def run(self, ctx: BackendContext) -> None:
            return None

        async def aclose(self) -> None:
            return None

    register_backend("null-test", Null)
    with pytest.raises(ConfigError):
        register_backend("null-test", Null)
    made = create_backend("null-test")
    assert isinstance(made, Backend)
    assert "null-test" in available_backends()


@pytest.mark.asyncio
async def test_add_device_checks_and_ring_magic(rig: Rig, image: Path) -> None:
    # several backends on one image: the image lock is not what this tests
    dev = rig.vop.add_device(BlockBackend(image, name="d0", force_share=True))
    vr = dev.vrings[0]
    magic = int.from_bytes(
        rig.hp.host_ram[vr.offset + vring_info_offset(vr.num) + 4 :][:4], "little"
    )
    assert magic == MIC_MAGIC + DeviceType.BLOCK + 0
    assert dev.view.vq_address(0) == rig.hp.host_ram_bus + vr.offset
    assert dev.view.ctrl(Ctrl.C2H_VDEV_DB) == dev.c2h_db
    with pytest.raises(LocalProtocolError, match="already exists"):
        rig.vop.add_device(BlockBackend(image, name="d0", force_share=True))
    with pytest.raises(LocalProtocolError, match="power of two"):
        rig.vop.add_device(BlockBackend(image, name="d1", queue_size=100, force_share=True))
    # c2h doorbells are spread least-used first
    more = [rig.vop.add_device(ConsoleBackend(name=f"c{i}")) for i in range(4)]
    assert sorted(d.c2h_db for d in [dev, *more]) == [0, 0, 1, 2, 3]


def test_entry_point_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    import mic_host.backends as backends

    class FakeEP:
        name = "ep-console"
        value = "mic_host.backends.console:ConsoleBackend"

        def load(self) -> object:
            return ConsoleBackend

    class BrokenEP(FakeEP):
        name = "ep-broken"
        value = "nowhere:Nothing"

        def load(self) -> object:
            raise ImportError("no module named nowhere")

    def fake_entry_points(*, group: str) -> list[FakeEP]:
        assert group == "mic_vop.backends"
        return [FakeEP(), BrokenEP()]

    monkeypatch.setattr(backends, "entry_points", fake_entry_points)
    monkeypatch.setattr(backends, "_registry", {})
    assert {"ep-console", "ep-broken"} <= set(available_backends())
    assert isinstance(create_backend("ep-console", name="c9"), ConsoleBackend)
    with pytest.raises(ConfigError, match="cannot load entry point"):
        create_backend("ep-broken")
