"""mic_host.config: the default parses, sizes, and every error names file, key and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from mic_host.config import (
    DEFAULT_CONFIG_TOML,
    DEVICE_OPTIONS,
    CardConfig,
    DaemonConfig,
    check_device_types,
    default_config,
    format_size,
    load_config,
    parse_config,
    parse_size,
    validate_device_options,
)
from mic_host.paths import default_state_dir, resolve_state_dir
from virtio.errors import ConfigError

SD = Path("/srv/mic-state")


def parse(text: str, **kw: object) -> DaemonConfig:
    return parse_config(text, "test.toml", state_dir=SD, **kw)  # type: ignore[arg-type]


def card(extra: str = "", devices: str = "") -> str:
    return f'[[cards]]\nname = "mic0"\n{extra}\n{devices}'


def expect(text: str, *fragments: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse(text)
    msg = str(ei.value)
    assert msg.startswith("test.toml: "), msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# ------------------------------------------------------------------ default


def test_default_config_parses_and_expands_state_dir() -> None:
    cfg = default_config(SD)
    assert cfg.source == "<embedded default>"
    assert cfg.state_dir == SD
    (c,) = cfg.cards
    assert c.name == "mic0"
    assert c.index == 0
    assert c.boot_at_start is True
    assert [d.type for d in c.devices] == ["console", "block"]
    blk = c.devices[1]
    assert blk.options == {"image": "/srv/mic-state/mic0.img", "size": 64 << 20, "create": True}
    assert c == CardConfig(name="mic0", boot_at_start=True, devices=c.devices)


def test_default_toml_is_exported_text() -> None:
    assert "{state_dir}/mic0.img" in DEFAULT_CONFIG_TOML


def test_defaults_of_a_minimal_card() -> None:
    (c,) = parse(card()).cards
    assert c == CardConfig(name="mic0")
    assert c.card_ram == 64 << 20
    assert c.heartbeat_timeout > c.heartbeat_interval
    assert c.devices == ()


def test_full_card() -> None:
    text = card(
        """boot_at_start = false
card_ram = "128M"
host_ram = 1048576
heartbeat_interval = 0.5
heartbeat_timeout = 2
boot_timeout = 10
shutdown_timeout = 3.5
used_ring_in_card = false""",
        """[[cards.devices]]
type = "block"
name = "root"
options = { image = "disks/{card}.img", read_only = true, serial = "SN1" }
[[cards.devices]]
type = "net"
options = { mac = "AA:bb:cc:dd:ee:01", mtu = 9000 }
[[cards.devices]]
type = "plugin-x"
options = { anything = [1, 2], size = "weird" }
""",
    )
    cfg = parse(text, base_dir="/etc/mic")
    (c,) = cfg.cards
    assert c.card_ram == 128 << 20
    assert c.host_ram == 1 << 20
    assert c.heartbeat_timeout == 2.0
    assert isinstance(c.boot_timeout, float)
    assert c.used_ring_in_card is False
    blk, net, plug = c.devices
    assert blk.name == "root"
    assert blk.options == {"image": "/etc/mic/disks/mic0.img", "read_only": True, "serial": "SN1"}
    assert net.options == {"mac": "aa:bb:cc:dd:ee:01", "mtu": 9000}
    # unknown (plug-in) types pass through untouched
    assert plug.options == {"anything": [1, 2], "size": "weird"}


def test_several_cards_and_lookup() -> None:
    cfg = parse(card() + '\n[[cards]]\nname = "mic1"\n')
    assert [c.name for c in cfg.cards] == ["mic0", "mic1"]
    assert cfg.card("mic1").index == 1
    with pytest.raises(ConfigError, match=r"no card 'mic7' in test.toml \(cards: mic0, mic1\)"):
        cfg.card("mic7")


# -------------------------------------------------------------------- files


def test_load_config_resolves_relative_paths_against_the_file(tmp_path: Path) -> None:
    f = tmp_path / "mic.toml"
    f.write_text(
        card(devices='[[cards.devices]]\ntype = "block"\noptions = { image = "img/a.img" }\n')
    )
    cfg = load_config(f, state_dir=tmp_path / "state")
    assert cfg.source == str(f)
    assert cfg.cards[0].devices[0].options["image"] == str(tmp_path / "img" / "a.img")


def test_load_config_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"^{f}: cannot read config: No such file"):
        load_config(f, state_dir=tmp_path)


def test_load_config_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=rf"^{f}: config is not UTF-8"):
        load_config(f, state_dir=tmp_path)


def test_load_config_error_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text('[[cards]]\nname = "gpu0"\n')
    with pytest.raises(ConfigError, match=rf"^{f}: cards\[0\]\.name: bad card name 'gpu0'"):
        load_config(f, state_dir=tmp_path)


# ------------------------------------------------------------------- errors

BLOCK = '[[cards.devices]]\ntype = "block"\n'


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("cards = [", ("invalid TOML",)),
        ("", ("cards: no cards",)),
        ("cards = []", ("cards: no cards",)),
        ("cards = 3", ("cards: expected an array of tables", "integer")),
        ("cards = [1]", ("cards[0]: expected a table, got integer",)),
        ("version = 2\n" + card(), ("version: unsupported config version 2",)),
        ("colour = 1\n" + card(), ("colour: unknown key", "known: cards, version")),
        ("[[cards]]\nboot_at_start = true", ("cards[0].name: required key is missing",)),
        ("[[cards]]\nname = 0", ("cards[0].name: expected a string, got integer",)),
        ('[[cards]]\nname = "mic"', ("cards[0].name: bad card name 'mic'", "^mic[0-9]+$")),
        ('[[cards]]\nname = "MIC0"', ("cards[0].name: bad card name",)),
        (
            card() + '\n[[cards]]\nname = "mic0"',
            ("cards[1].name: duplicate card name 'mic0'", "cards[0]"),
        ),
        (card("colour = 1"), ("cards[0].colour: unknown key",)),
        (
            card("boot_at_start = 1"),
            ("cards[0].boot_at_start: expected true or false, got integer",),
        ),
        (card('card_ram = "64X"'), ("cards[0].card_ram: bad size '64X'",)),
        (card("card_ram = 0"), ("cards[0].card_ram: size must be positive",)),
        (card("card_ram = -4096"), ("cards[0].card_ram: bad size -4096: must not be negative",)),
        (card("host_ram = 1000"), ("cards[0].host_ram: size 1000 is not a multiple of 4096",)),
        (card("host_ram = true"), ("cards[0].host_ram: bad size True",)),
        (card("card_ram = 1.5"), ("cards[0].card_ram: bad size 1.5", "not float")),
        (
            card('boot_timeout = "10s"'),
            ("cards[0].boot_timeout: expected a number of seconds, got string",),
        ),
        (card("boot_timeout = 0"), ("cards[0].boot_timeout: must be a positive number",)),
        (card("shutdown_timeout = -1.0"), ("cards[0].shutdown_timeout: must be a positive",)),
        (card("boot_timeout = inf"), ("cards[0].boot_timeout: must be a positive",)),
        (card("boot_timeout = nan"), ("cards[0].boot_timeout: must be a positive",)),
        (card("heartbeat_interval = true"), ("cards[0].heartbeat_interval: expected a number",)),
        (
            card("heartbeat_interval = 5\nheartbeat_timeout = 5"),
            ("cards[0].heartbeat_timeout: must exceed heartbeat_interval",),
        ),
        (card("devices = 1"), ("cards[0].devices: expected an array of tables",)),
        (card("devices = [1]"), ("cards[0].devices[0]: expected a table, got integer",)),
        (
            card(devices="[[cards.devices]]\nname = 'x'"),
            ("cards[0].devices[0].type: required key is missing",),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 3"),
            ("cards[0].devices[0].type: expected a string",),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 'Block!'"),
            ("cards[0].devices[0].type: bad device type 'Block!'",),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 'console'\nsize = 1"),
            ("cards[0].devices[0].size: unknown key",),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 'console'\nname = 5"),
            ("cards[0].devices[0].name: expected a string",),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 'console'\nname = 'a b'"),
            ("cards[0].devices[0].name: bad device name 'a b'",),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 'console'\nname = 'c'\n" * 2),
            ("cards[0].devices[1].name: duplicate device name 'c'", "devices[0]"),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 'console'\noptions = 1"),
            ("cards[0].devices[0].options: expected a table",),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 'console'\noptions = { x = 1 }"),
            ("cards[0].devices[0].options.x: unknown option for console devices", "known: ring"),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 'console'\noptions = { ring = 'ring' }"),
            ("cards[0].devices[0].options.ring: expected one of split, packed, got 'ring'",),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 'plugin-x'\noptions = { ring = true }"),
            ("cards[0].devices[0].options.ring: expected one of split, packed, got True",),
        ),
        (
            card(devices=BLOCK + "options = {}"),
            ("cards[0].devices[0].options.image: required option of block devices is missing",),
        ),
        (
            card(devices=BLOCK + "options = { image = 'a', size = '64X' }"),
            ("cards[0].devices[0].options.size: bad size '64X'",),
        ),
        (
            card(devices=BLOCK + "options = { image = 'a', size = 0 }"),
            ("cards[0].devices[0].options.size: size must be positive",),
        ),
        (
            card(devices=BLOCK + "options = { image = 'a', size = -1 }"),
            ("cards[0].devices[0].options.size: bad size -1",),
        ),
        (
            card(devices=BLOCK + "options = { image = 'a', create = true }"),
            ("cards[0].devices[0].options.size: create = true needs a size",),
        ),
        (
            card(devices=BLOCK + "options = { image = 'a', create = 'yes' }"),
            ("cards[0].devices[0].options.create: expected true or false, got string",),
        ),
        (
            card(devices=BLOCK + "options = { image = 7 }"),
            ("cards[0].devices[0].options.image: expected a string, got integer",),
        ),
        (
            card(devices=BLOCK + "options = { image = '' }"),
            ("cards[0].devices[0].options.image: empty path",),
        ),
        (
            card(devices=BLOCK + "options = { image = '{home}/a' }"),
            ("cards[0].devices[0].options.image: unknown placeholder {home}",),
        ),
        (
            card(devices=BLOCK + "options = { image = 'a', serial = '123456789012345678901' }"),
            ("options.serial: serial", "longer than 20 bytes"),
        ),
        (
            card(devices=BLOCK + "options = { image = 'a', colour = 'red' }"),
            ("cards[0].devices[0].options.colour: unknown option for block devices", "image"),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 'net'\noptions = { mac = 'zz' }"),
            ("cards[0].devices[0].options.mac: bad MAC address 'zz'",),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 'net'\noptions = { mtu = 0 }"),
            ("cards[0].devices[0].options.mtu: must be positive",),
        ),
        (
            card(devices="[[cards.devices]]\ntype = 'net'\noptions = { mtu = '1500' }"),
            ("cards[0].devices[0].options.mtu: expected an integer, got string",),
        ),
    ],
)
def test_errors_name_file_key_and_problem(text: str, fragments: tuple[str, ...]) -> None:
    expect(text, *fragments)


def test_second_card_error_has_its_index() -> None:
    text = card(devices='[[cards.devices]]\ntype = "console"\n') + (
        '\n[[cards]]\nname = "mic1"\n[[cards.devices]]\ntype = "console"\n'
        '[[cards.devices]]\ntype = "block"\noptions = { image = "a", size = "1Q" }\n'
    )
    expect(text, "cards[1].devices[1].options.size: bad size '1Q'")


# -------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("64M", 64 << 20),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
        ("1GiB", 1 << 30),
        ("16MB", 16 << 20),
        (" 8 M ", 8 << 20),
        ("512B", 512),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value", ["", "M", "64X", "1.5G", "-1", "64 MiBs", "64iB", True, 1.0, None, [1], -5]
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match="bad size"):
        parse_size(value)


@pytest.mark.parametrize(
    ("n", "text"), [(64 << 20, "64M"), (1 << 30, "1G"), (1000, "1000"), (0, "0"), (3 << 10, "3K")]
)
def test_format_size_round_trips(n: int, text: str) -> None:
    assert format_size(n) == text
    assert parse_size(text) == n


# -------------------------------------------------------- attach and types


def test_validate_device_options_for_attach(tmp_path: Path) -> None:
    opts = validate_device_options(
        "block", {"image": "x.img", "size": "1M", "create": True}, state_dir=tmp_path, card="mic0"
    )
    assert opts == {"image": str(tmp_path / "x.img"), "size": 1 << 20, "create": True}
    with pytest.raises(ConfigError, match=r"^attach: options.size: bad size"):
        validate_device_options(
            "block", {"image": "a", "size": "x"}, state_dir=tmp_path, card="mic0"
        )
    with pytest.raises(ConfigError, match=r"^attach: type: bad device type"):
        validate_device_options("Bad Type", {}, state_dir=tmp_path, card="mic0")
    assert validate_device_options("other", {"k": 1}, state_dir=tmp_path, card="mic0") == {"k": 1}


def test_check_device_types() -> None:
    cfg = default_config(SD)
    check_device_types(cfg, {"block", "console"})
    with pytest.raises(
        ConfigError,
        match=r"<embedded default>: cards\[0\]\.devices\[1\]\.type: unknown device type 'block' "
        r"\(registered: console\)",
    ):
        check_device_types(cfg, {"console"})


def test_builtin_option_tables_exist() -> None:
    assert {"block", "console", "net"} <= set(DEVICE_OPTIONS)
    # image is required of a disk MIC-VOP serves (backend "file", the default),
    # not of one a vhost-user back-end serves (tests/vhost_user/test_frontend.py)
    with pytest.raises(ConfigError, match=r"options\.image: required option"):
        validate_device_options("block", {}, state_dir="/tmp", card="mic0")


# ---------------------------------------------------------------- state dir


def test_state_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MIC_STATE_DIR", raising=False)
    assert default_state_dir() == tmp_path / "xdg" / "mic-vop"
    assert resolve_state_dir() == tmp_path / "xdg" / "mic-vop"
    monkeypatch.setenv("MIC_STATE_DIR", str(tmp_path / "env"))
    assert resolve_state_dir() == tmp_path / "env"
    assert resolve_state_dir(tmp_path / "arg") == tmp_path / "arg"
