"""examples/virtio-rng's backend and driver against each other in one process (the
VOP rig: a host Vop and a card VirtioBus over one memory, no processes): reads,
the rate bound, resets, and what each side does with a peer that breaks §5.4.

The example's sources are imported from ``examples/virtio-rng/src``; the
fresh-venv test (test_virtio_rng.py) runs them installed.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import pytest_asyncio

from mic_card.bus import DriverEntry, DriverRegistry, VirtioBus
from mic_card.drivers import builtin_registry
from tests.vop.rig import Rig
from virtio.errors import (
    BrokenResourceError,
    ClosedResourceError,
    ConfigError,
    RemoteProtocolError,
)

SRC = Path(__file__).resolve().parents[2] / "examples" / "virtio-rng" / "src"


@pytest.fixture
def rng(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, ModuleType]:
    """The example's backend and driver modules."""
    monkeypatch.syspath_prepend(str(SRC))
    return (
        importlib.import_module("mic_vop_rng.backend"),
        importlib.import_module("mic_vop_rng.driver"),
    )


def table(driver: type) -> DriverRegistry:
    reg = builtin_registry()
    reg.add(DriverEntry.from_factory("virtio-rng", driver, "plug-in mic-vop-rng"))
    return reg


async def _boot(rig: Rig, driver: type) -> VirtioBus:
    return await rig.boot(drivers=table(driver))


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        await r.aclose()


@pytest.mark.asyncio
async def test_read_through_the_rig(rig: Rig, rng: tuple[ModuleType, ModuleType]) -> None:
    backend_mod, driver_mod = rng
    backend = backend_mod.RngBackend(name="entropy")
    rig.add(backend)
    bus = await _boot(rig, driver_mod.RngDriver)
    drv = bus.driver("virtio4-0")
    assert isinstance(drv, driver_mod.RngDriver)
    a, b = await drv.read(32), await drv.read(32)
    assert len(a) == len(b) == 32
    assert a != b
    big = await drv.read(10_000)  # several buffers (4096 B each)
    assert len(big) == 10_000
    assert await drv.read(0) == b""
    assert backend.bytes_served == drv.bytes_read == 10_064
    info = bus.device("virtio4-0").info()
    assert info["driver_info"]["bytes_read"] == 10_064
    assert info["features"] & ((1 << 24) - 1) == 0  # no device-specific bits (§5.4.3)


@pytest.mark.asyncio
async def test_the_rate_bound_makes_reads_wait(
    rig: Rig, rng: tuple[ModuleType, ModuleType]
) -> None:
    backend_mod, driver_mod = rng
    rig.add(backend_mod.RngBackend(name="slow", max_bytes=100, period=0.2, max_request=64))
    bus = await _boot(rig, driver_mod.RngDriver)
    t0 = time.monotonic()
    assert len(await bus.driver("virtio4-0").read(300)) == 300
    assert time.monotonic() - t0 >= 0.4  # 300 B at 100 B per 0.2 s: two waits at least


@pytest.mark.asyncio
async def test_a_reset_device_serves_a_new_driver(
    rig: Rig, rng: tuple[ModuleType, ModuleType]
) -> None:
    backend_mod, driver_mod = rng
    rig.add(backend_mod.RngBackend())
    bus = await _boot(rig, driver_mod.RngDriver)
    old = bus.driver("virtio4-0")
    await old.read(16)
    await bus.reset_device("virtio4-0")
    with pytest.raises(BrokenResourceError):
        await old.read(16)
    new = bus.driver("virtio4-0")
    assert new is not old
    assert len(await new.read(16)) == 16


@pytest.mark.asyncio
async def test_a_device_readable_buffer_gets_nothing_and_one_log_line(
    rig: Rig, rng: tuple[ModuleType, ModuleType], caplog: pytest.LogCaptureFixture
) -> None:
    backend_mod, driver_mod = rng
    backend = backend_mod.RngBackend(name="entropy")
    rig.add(backend)
    bus = await _boot(rig, driver_mod.RngDriver)
    dev = bus.device("virtio4-0")
    ep = dev.endpoints[0]
    src, dst = dev.alloc(16), dev.alloc(16)
    for _ in range(3):  # §5.4.6.1 broken by the driver: answered with 0 bytes
        assert await ep.submit([(src, 16)], [(dst, 16)]) == 0
    assert backend.bad_requests == 3
    warnings = [r for r in caplog.records if "device-readable" in r.getMessage()]
    assert len(warnings) == 1
    assert len(await bus.driver("virtio4-0").read(8)) == 8  # the device still serves


@pytest.mark.asyncio
async def test_the_driver_refuses_an_empty_answer(
    rig: Rig, rng: tuple[ModuleType, ModuleType]
) -> None:
    backend_mod, driver_mod = rng

    class Stingy(backend_mod.RngBackend):  # type: ignore[name-defined,misc]
        async def _fill(self, chain: Any, ctx: Any) -> int:
            return 0  # breaks §5.4.6.2: one or more bytes

    rig.add(Stingy())
    bus = await _boot(rig, driver_mod.RngDriver)
    with pytest.raises(RemoteProtocolError, match="virtio4-0: the host used a buffer without"):
        await bus.driver("virtio4-0").read(8)


@pytest.mark.asyncio
async def test_a_device_with_two_queues_is_not_bound(
    rig: Rig, rng: tuple[ModuleType, ModuleType], caplog: pytest.LogCaptureFixture
) -> None:
    backend_mod, driver_mod = rng

    class TwoQueues(backend_mod.RngBackend):  # type: ignore[name-defined,misc]
        def queue_sizes(self) -> tuple[int, ...]:
            return (64, 64)

    rig.add(TwoQueues())
    caplog.set_level(logging.ERROR)
    bus = await _boot(rig, driver_mod.RngDriver)
    # listed, failed with the driver's reason, and no driver to reach
    [info] = bus.devices()
    assert (info["name"], info["state"], info["driver"]) == ("virtio4-0", "failed", None)
    assert "virtio-rng has one queue, the host offered 2" in info["error"]
    assert "virtio-rng has one queue, the host offered 2" in caplog.text
    with pytest.raises(ClosedResourceError, match="virtio4-0 has no driver bound"):
        bus.driver("virtio4-0")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"queue_size": 3}, "rng r: queue_size 3 is not a power of two"),
        ({"queue_size": 512}, "rng r: queue_size 512 is not an integer in 1..256"),
        ({"max_bytes": 0}, "rng r: max_bytes 0 is not an integer in"),
        ({"max_request": "4K"}, "rng r: max_request '4K' is not an integer in"),
        ({"period": 0}, "rng r: period 0 is not a positive number of seconds"),
        ({"period": True}, "rng r: period True is not a positive number of seconds"),
    ],
)
def test_bad_options_name_the_device_and_the_option(
    rng: tuple[ModuleType, ModuleType], options: dict[str, Any], message: str
) -> None:
    backend_mod, _ = rng
    with pytest.raises(ConfigError, match=message):
        backend_mod.RngBackend(name="r", **options)
