"""The card's driver table (:mod:`mic_card.bus.registry`): names, the default rule, resolve.

Pure unit tests (no processes): the table is data. What binding does with it
on a live card is in :mod:`tests.card.test_binding`.
"""

from __future__ import annotations

from typing import Any

import pytest

from mic_card.bus import DriverEntry, DriverRegistry, UnknownDriverError
from mic_card.drivers import BlockDevice, ConsoleDevice, NetDevice, builtin_registry
from mic_card.drivers.console import SinglePortConsole
from virtio.errors import LocalProtocolError


class OtherBlk:
    NAME = "my-blk"
    DEVICE_TYPE = 2
    FEATURES = 0

    def __init__(self, dev: Any) -> None: ...

    def config_changed(self) -> None: ...

    def detach(self, exc: Exception) -> None: ...


class Untyped:
    FEATURES = 0

    def __init__(self, dev: Any) -> None: ...

    def config_changed(self) -> None: ...

    def detach(self, exc: Exception) -> None: ...


def default(reg: DriverRegistry, device_type: int) -> DriverEntry:
    entry = reg.default(device_type)
    assert entry is not None
    return entry


def test_builtins_by_name_and_type() -> None:
    reg = builtin_registry()
    assert reg.names() == ["virtio-net", "virtio-blk", "virtio-console"]
    assert reg.get("virtio-blk").factory is BlockDevice
    assert [default(reg, t).factory for t in (1, 2, 3)] == [NetDevice, BlockDevice, ConsoleDevice]
    assert reg.default(4) is None
    legacy = builtin_registry(console_multiport=False)
    assert legacy.get("virtio-console").factory is SinglePortConsole
    assert legacy.names() == reg.names()


def test_default_is_highest_priority_then_first_added() -> None:
    reg = builtin_registry()
    reg.add(DriverEntry("blk-low", 2, OtherBlk, priority=-1, origin="plug-in a"))
    assert default(reg, 2).name == "virtio-blk"
    reg.add(DriverEntry("blk-high", 2, OtherBlk, priority=5, origin="plug-in b"))
    reg.add(DriverEntry("blk-high-too", 2, OtherBlk, priority=5, origin="plug-in c"))
    assert [e.name for e in reg.for_type(2)] == [
        "blk-high",
        "blk-high-too",
        "virtio-blk",
        "blk-low",
    ]
    assert default(reg, 2).name == "blk-high"


def test_names_are_unique_unless_replaced() -> None:
    reg = builtin_registry()
    with pytest.raises(LocalProtocolError, match="'virtio-blk' is already registered"):
        reg.register("virtio-blk", 2, OtherBlk, origin="plug-in x")
    reg.add(DriverEntry("virtio-blk", 2, OtherBlk), replace=True)
    assert reg.get("virtio-blk").factory is OtherBlk
    with pytest.raises(LocalProtocolError, match="needs a name"):
        reg.register("", 2, OtherBlk)


def test_resolve_names_the_driver_and_the_device() -> None:
    reg = builtin_registry()
    assert reg.resolve("virtio-blk", "vda", 2).factory is BlockDevice
    with pytest.raises(UnknownDriverError) as e:
        reg.resolve("virtio-rng", "vda", 2)
    assert str(e.value) == (
        "cannot bind vda: no driver 'virtio-rng' "
        "(known drivers: virtio-net, virtio-blk, virtio-console)"
    )
    with pytest.raises(UnknownDriverError, match="virtio-console to vda: virtio-console drives"):
        reg.resolve("virtio-console", "vda", 2)
    # factory objects: named by NAME or qualified name, checked by DEVICE_TYPE if they say
    assert reg.resolve(OtherBlk, "vda", 2).name == "my-blk"
    with pytest.raises(UnknownDriverError, match="cannot bind my-blk to hvc0"):
        reg.resolve(OtherBlk, "hvc0", 3)
    entry = reg.resolve(Untyped, "virtio4-0", 4)
    assert (entry.name, entry.device_type, entry.origin) == ("test_registry.Untyped", 4, "app")


def test_from_mapping_names_each_type() -> None:
    reg = DriverRegistry.from_mapping({2: OtherBlk, 9: Untyped})
    assert reg.names() == ["virtio-blk", "virtio-9"]
