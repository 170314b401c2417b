"""Card driver plug-ins (``mic_vop.drivers`` entry points): loading, the priority
rule, and plug-ins that cannot be used (logged by name; the built-in serves).

Each test installs real distributions (a ``.dist-info`` and modules) into a
temporary folder on ``sys.path``, under a group of its own so nothing installed
in the environment interferes; one test uses the real group name.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mic_card.bus import DriverEntry, DriverRegistry, UnknownDriverError
from mic_card.drivers import BlockDevice, ConsoleDevice, NetDevice, builtin_registry
from mic_card.drivers.console import SinglePortConsole
from mic_card.drivers.plugins import ENTRY_POINT_GROUP, load_driver_table
from tests.card.plugin_dist import make_dist
from virtio.errors import LocalProtocolError

BLOCK, CONSOLE, RNG = 2, 3, 4

DRIVER_MODULE = """
class Driver:
    DEVICE_TYPE = {dtype}
    FEATURES = 0
    PRIORITY = {priority}

    def __init__(self, dev):
        self.dev = dev
"""


def driver_module(dtype: int, priority: int = 0) -> str:
    return DRIVER_MODULE.format(dtype=dtype, priority=priority)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """sys.path restored and the plug-ins' modules forgotten after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.fixture
def group() -> str:
    """A fresh entry-point group, so nothing installed in the environment interferes."""
    return f"mic_vop.test_drivers_{uuid.uuid4().hex}"


def serving(table: DriverRegistry, device_type: int) -> DriverEntry:
    """The entry that serves new devices of ``device_type`` (there must be one)."""
    entry = table.default(device_type)
    assert entry is not None, f"no driver serves device type {device_type}"
    return entry


def install(root: Path, group: str, dist: str, eps: dict[str, str], mods: dict[str, str]) -> None:
    """Install ``dist`` into its own folder under ``root`` and put it on sys.path."""
    make_dist(root / dist, dist, eps, mods, group=group)
    sys.path.insert(0, str(root / dist))


def test_builtins_alone(group: str) -> None:
    table = load_driver_table(group=group)
    assert [(s.name, s.device_type, s.priority, s.builtin) for s in table] == [
        ("virtio-net", 1, 0, True),
        ("virtio-blk", 2, 0, True),
        ("virtio-console", 3, 0, True),
    ]
    assert {t: serving(table, t).factory for t in (1, 2, 3)} == {
        1: NetDevice,
        2: BlockDevice,
        3: ConsoleDevice,
    }
    assert table.contested() == {}
    single = load_driver_table(group=group, console_multiport=False)
    assert serving(single, CONSOLE).factory is SinglePortConsole
    assert single.get("virtio-console").factory is SinglePortConsole


def test_plugin_for_a_new_type_is_loaded(
    tmp_path: Path, group: str, caplog: pytest.LogCaptureFixture
) -> None:
    install(
        tmp_path, group, "rngpkg", {"virtio-rng": "rngmod:Driver"}, {"rngmod": driver_module(RNG)}
    )
    caplog.set_level(logging.INFO, "mic_card.drivers")
    table = load_driver_table(group=group)
    spec = table.get("virtio-rng")
    assert (spec.device_type, spec.priority, spec.builtin) == (RNG, 0, False)
    assert spec.origin == "plug-in rngpkg"
    assert table.names() == ["virtio-net", "virtio-blk", "virtio-console", "virtio-rng"]
    assert serving(table, RNG) is spec
    assert (
        "card driver plug-in 'virtio-rng' loaded for device type 4 "
        "(entry point rngmod:Driver (rngpkg 1.0), priority 0)" in caplog.text
    )


def test_higher_priority_plugin_serves_and_the_log_says_so(
    tmp_path: Path, group: str, caplog: pytest.LogCaptureFixture
) -> None:
    install(tmp_path, group, "fastblk", {"fast-blk": "fastblk_drv:Driver"},
            {"fastblk_drv": driver_module(BLOCK, priority=10)})  # fmt: skip
    caplog.set_level(logging.INFO, "mic_card.drivers")
    table = load_driver_table(group=group)
    assert serving(table, BLOCK) is table.get("fast-blk")
    assert [s.name for s in table.for_type(BLOCK)] == ["fast-blk", "virtio-blk"]
    assert list(table.contested()) == [BLOCK]
    # the built-in stays known by name (a card app may bind it)
    assert table.get("virtio-blk").factory is BlockDevice
    assert table.resolve("virtio-blk", "vda", BLOCK).factory is BlockDevice
    lines = [r.getMessage() for r in caplog.records if "serves" in r.getMessage()]
    assert lines == [
        "device type 2: driver 'fast-blk' (priority 10, plug-in fastblk) serves; "
        "also claimed by 'virtio-blk' (priority 0, built-in)"
    ]


def test_on_a_tie_the_builtin_serves(
    tmp_path: Path, group: str, caplog: pytest.LogCaptureFixture
) -> None:
    install(tmp_path, group, "myblk", {"my-blk": "myblk_drv:Driver"},
            {"myblk_drv": driver_module(BLOCK)})  # fmt: skip
    caplog.set_level(logging.INFO, "mic_card.drivers")
    table = load_driver_table(group=group)
    assert serving(table, BLOCK).factory is BlockDevice
    assert (
        "device type 2: driver 'virtio-blk' (priority 0, built-in) serves; "
        "also claimed by 'my-blk' (priority 0, plug-in myblk)" in caplog.text
    )


def test_plugins_tie_break_by_name(tmp_path: Path, group: str) -> None:
    install(
        tmp_path,
        group,
        "zeta",
        {"zeta-rng": "zeta_drv:Driver"},
        {"zeta_drv": driver_module(RNG, 5)},
    )
    install(tmp_path, group, "alpha", {"alpha-rng": "alpha_drv:Driver"},
            {"alpha_drv": driver_module(RNG, 5)})  # fmt: skip
    install(
        tmp_path, group, "low", {"aaa-rng": "low_drv:Driver"}, {"low_drv": driver_module(RNG, 1)}
    )
    table = load_driver_table(group=group)
    assert [s.name for s in table.for_type(RNG)] == ["alpha-rng", "zeta-rng", "aaa-rng"]
    # negative priorities are allowed: a fallback driver below the built-in
    install(tmp_path, group, "fallback", {"slow-blk": "slow_drv:Driver"},
            {"slow_drv": driver_module(BLOCK, -1)})  # fmt: skip
    table = load_driver_table(group=group)
    assert [s.name for s in table.for_type(BLOCK)] == ["virtio-blk", "slow-blk"]


@pytest.mark.parametrize(
    ("module", "why"),
    [
        (None, "failed to load: ModuleNotFoundError: No module named 'brokenblk_drv'"),
        ("import not_installed_anywhere\n", "failed to load: ModuleNotFoundError"),
        ("def oops(:\n", "failed to load: SyntaxError"),
        ("raise RuntimeError('no hardware here')\n", "failed to load: RuntimeError: no hardware"),
        ("Other = 1\n", "failed to load: AttributeError"),
    ],
    ids=["missing-module", "import-error", "syntax-error", "raises", "missing-attr"],
)
def test_a_plugin_that_fails_to_import_is_logged_and_the_builtin_serves(
    tmp_path: Path, group: str, caplog: pytest.LogCaptureFixture, module: str | None, why: str
) -> None:
    mods = {"brokenblk_drv": module} if module is not None else {}
    install(tmp_path, group, "brokenblk", {"broken-blk": "brokenblk_drv:Driver"}, mods)
    install(
        tmp_path, group, "rngpkg", {"virtio-rng": "rngmod:Driver"}, {"rngmod": driver_module(RNG)}
    )
    table = load_driver_table(group=group)
    assert serving(table, BLOCK).factory is BlockDevice
    assert serving(table, RNG) is table.get("virtio-rng")  # the others still load
    with pytest.raises(UnknownDriverError, match="no driver 'broken-blk'"):
        table.get("broken-blk")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    msg = errors[0].getMessage()
    assert msg.startswith(
        "card driver plug-in 'broken-blk' (entry point brokenblk_drv:Driver (brokenblk 1.0))"
    )
    assert why in msg
    assert msg.endswith("; skipped")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("class Driver:\n    FEATURES = 0\n", "has no DEVICE_TYPE"),
        ("class Driver:\n    DEVICE_TYPE = 200\n    FEATURES = 0\n",
         "DEVICE_TYPE 200 outside 1..127"),
        ("class Driver:\n    DEVICE_TYPE = 0\n    FEATURES = 0\n", "DEVICE_TYPE 0 outside"),
        ("class Driver:\n    DEVICE_TYPE = '4'\n    FEATURES = 0\n", "DEVICE_TYPE is str '4'"),
        ("class Driver:\n    DEVICE_TYPE = True\n    FEATURES = 0\n", "DEVICE_TYPE is bool True"),
        ("class Driver:\n    DEVICE_TYPE = 4\n", "has no FEATURES"),
        ("class Driver:\n    DEVICE_TYPE = 4\n    FEATURES = 1 << 64\n",
         "FEATURES 0x10000000000000000 is not a 64-bit feature set"),
        ("class Driver:\n    DEVICE_TYPE = 4\n    FEATURES = 0\n    PRIORITY = 1.5\n",
         "PRIORITY is float 1.5"),
        ("Driver = 42\n", "int is not callable"),
    ],
)  # fmt: skip
def test_a_plugin_without_a_valid_contract_is_skipped(
    tmp_path: Path, group: str, caplog: pytest.LogCaptureFixture, body: str, why: str
) -> None:
    install(tmp_path, group, "badpkg", {"bad-drv": "bad_drv:Driver"}, {"bad_drv": body})
    table = load_driver_table(group=group)
    assert table.names() == ["virtio-net", "virtio-blk", "virtio-console"]
    assert f"card driver plug-in 'bad-drv' (entry point bad_drv:Driver (badpkg 1.0)): {why}" in (
        caplog.text
    )


def test_a_plugin_may_not_take_a_builtins_name(
    tmp_path: Path, group: str, caplog: pytest.LogCaptureFixture
) -> None:
    install(tmp_path, group, "sneaky", {"virtio-blk": "sneaky_drv:Driver"},
            {"sneaky_drv": driver_module(BLOCK, 99)})  # fmt: skip
    table = load_driver_table(group=group)
    assert serving(table, BLOCK).factory is BlockDevice
    assert table.get("virtio-blk").origin == "built-in"
    assert "card driver plug-in 'virtio-blk' (entry point sneaky_drv:Driver (sneaky 1.0)): " in (
        caplog.text
    )
    assert "the name is taken by another driver; skipped" in caplog.text


def test_the_real_group_is_read(tmp_path: Path) -> None:
    install(tmp_path, ENTRY_POINT_GROUP, "realgrp", {"test-rng": "realgrp_drv:Driver"},
            {"realgrp_drv": driver_module(RNG)})  # fmt: skip
    assert ENTRY_POINT_GROUP == "mic_vop.drivers"
    assert load_driver_table().get("test-rng").device_type == RNG


def test_table_rules() -> None:
    table = builtin_registry()
    with pytest.raises(LocalProtocolError, match="'virtio-blk' is already registered"):
        table.add(DriverEntry("virtio-blk", RNG, BlockDevice))
    with pytest.raises(
        UnknownDriverError, match=r"known drivers: virtio-net, virtio-blk, virtio-console"
    ):
        table.get("nope")
    assert table.default(RNG) is None
    assert table.for_type(RNG) == []
    assert table.contested() == {}
    plain = DriverRegistry.from_mapping({BLOCK: BlockDevice})
    assert plain.get("virtio-blk").factory is BlockDevice
    assert [d["name"] for d in table.info() if d["default"]] == [
        "virtio-net",
        "virtio-blk",
        "virtio-console",
    ]
    table.add(DriverEntry("fast-blk", BLOCK, BlockDevice, 3, "plug-in fastblk"))
    assert [(d["name"], d["default"]) for d in table.info() if d["type"] == BLOCK] == [
        ("fast-blk", True),
        ("virtio-blk", False),
    ]
    assert table.info()[1] == {
        "name": "fast-blk",
        "type": BLOCK,
        "priority": 3,
        "origin": "plug-in fastblk",
        "default": True,
    }


def test_driver_entry_accepts_a_plain_factory_function() -> None:
    def factory(dev: object) -> object:
        return dev

    factory.DEVICE_TYPE = RNG  # type: ignore[attr-defined]
    factory.FEATURES = 0  # type: ignore[attr-defined]
    spec = DriverEntry.from_factory("fn-rng", factory, "test")
    assert (spec.device_type, spec.priority, spec.factory) == (RNG, 0, factory)


def test_supported_features_stands_in_for_features() -> None:
    class Picky:
        DEVICE_TYPE = RNG
        PRIORITY = -2

        def __init__(self, dev: object) -> None: ...

        @classmethod
        def supported_features(cls, dev: object) -> int:
            return 0

    spec = DriverEntry.from_factory("picky", Picky, "test")
    assert (spec.device_type, spec.priority) == (RNG, -2)
