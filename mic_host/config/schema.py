"""The mic-host daemon's configuration: a TOML file, parsed into frozen values.

Owns the schema (the frozen value classes), the parsing and validation of
the file (every error names the file, the key path and the problem) and the
embedded default configuration, and :func:`check_card_devices` (does a
card's device list, e.g. with one more attached, still fit). Device options
are checked by :mod:`mic_host.config.options`, sizes parsed by
:mod:`mic_host.config.sizes`, a card's RAM and devices bounded by
:mod:`mic_host.config.limits` (imported when a card is checked). Imports
``tomllib``, those and ``virtio.errors``; no asyncio.

The schema itself is described in the package docstring (:mod:`mic_host.config`)
and ``docs/cli.md``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mic_host.config.options import TYPE_RE, Ctx, check_options, type_name
from mic_host.config.sizes import parse_size
from virtio.errors import ConfigError

__all__ = [
    "CardConfig",
    "DaemonConfig",
    "DeviceConfig",
    "DEFAULT_CONFIG_TOML",
    "CARD_NAME_RE",
    "load_config",
    "parse_config",
    "default_config",
    "check_device_types",
    "check_card_devices",
]

CARD_NAME_RE = re.compile(r"^mic[0-9]+$")
_DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_PAGE = 4096

DEFAULT_CONFIG_TOML = """\
# mic-host embedded default: one card, a console and a 64 MiB scratch disk.
version = 1

[[cards]]
name = "mic0"
boot_at_start = true

[[cards.devices]]
type = "console"

[[cards.devices]]
type = "block"
name = "disk"
options = { image = "{state_dir}/mic0.img", size = "64M", create = true }
"""


# ------------------------------------------------------------- value classes


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """One virtio device of a card.

    ``type`` names the backend; ``name`` is an optional label unique per card
    (``micctl detach`` may use it); ``options`` are the backend's settings,
    already checked and normalised for the built-in types (sizes are ints,
    paths absolute, placeholders expanded).
    """

    type: str
    name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CardConfig:
    """One card the daemon owns. Sizes in bytes, durations in seconds."""

    name: str
    boot_at_start: bool = False
    card_ram: int = 64 << 20
    host_ram: int = 16 << 20
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    boot_timeout: float = 30.0
    shutdown_timeout: float = 10.0
    used_ring_in_card: bool = True
    devices: tuple[DeviceConfig, ...] = ()
    #: argv prefix for the card OS process ("wrap it"); empty: run it directly
    card_command: tuple[str, ...] = ()

    @property
    def index(self) -> int:
        """The card number (``mic3 -> 3``), as in the Linux ``micN`` names."""
        return int(self.name[3:])


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The whole configuration: the cards, where it came from, and the state directory."""

    cards: tuple[CardConfig, ...]
    state_dir: Path
    source: str = "<embedded default>"

    def card(self, name: str) -> CardConfig:
        """The card called ``name``.

        Raises:
            ConfigError: no such card (the message lists the known ones).
        """
        for c in self.cards:
            if c.name == name:
                return c
        known = ", ".join(c.name for c in self.cards) or "none"
        raise ConfigError(f"no card {name!r} in {self.source} (cards: {known})")


def check_device_types(config: DaemonConfig, known: Mapping[str, object] | set[str]) -> None:
    """Check that every device type of ``config`` names a registered backend.

    Raises:
        ConfigError: "<source>: cards[i].devices[j].type: unknown device type ..."
    """
    names = set(known)
    for i, c in enumerate(config.cards):
        for j, d in enumerate(c.devices):
            if d.type not in names:
                raise ConfigError(
                    f"{config.source}: cards[{i}].devices[{j}].type: unknown device type "
                    f"{d.type!r} (registered: {', '.join(sorted(names)) or 'none'})"
                )


def _card_problem(
    card_ram: int, host_ram: int, devices: Sequence[DeviceConfig]
) -> tuple[str, str] | None:
    # Imported here: see mic_host.config.limits (micctl starts without it).
    from mic_host.config.limits import card_problem

    return card_problem(card_ram, host_ram, [(d.type, d.options) for d in devices])


def check_card_devices(
    card: CardConfig, devices: Sequence[DeviceConfig], *, source: str = "attach"
) -> None:
    """Check that ``devices`` (a card's whole list, e.g. its devices plus one
    being attached) fit ``card``: the device page and the host RAM window, as
    :func:`parse_config` checks a card's configured devices.

    Raises:
        ConfigError: "<source>: <card>.<key>: <problem>", e.g. "attach:
            mic0.devices[31]: the device page is full: ...".
    """
    bad = _card_problem(card.card_ram, card.host_ram, devices)
    if bad is not None:
        raise ConfigError(f"{source}: {card.name}.{bad[0]}: {bad[1]}")


# ------------------------------------------------------------------- parsing

_CARD_KEYS = {
    "name",
    "boot_at_start",
    "card_ram",
    "host_ram",
    "heartbeat_interval",
    "heartbeat_timeout",
    "boot_timeout",
    "shutdown_timeout",
    "used_ring_in_card",
    "devices",
    "card_command",
}
_DEVICE_KEYS = {"type", "name", "options"}
_TOP_KEYS = {"version", "cards"}


def _unknown(ctx: Ctx, prefix: str, table: Mapping[str, object], known: set[str]) -> None:
    for k in table:
        if k not in known:
            where = f"{prefix}.{k}" if prefix else k
            raise ctx.error(where, f"unknown key (known: {', '.join(sorted(known))})")


def _get_bool(ctx: Ctx, t: Mapping[str, object], key: str, where: str, default: bool) -> bool:
    v = t.get(key, default)
    if not isinstance(v, bool):
        raise ctx.error(f"{where}.{key}", f"expected true or false, got {type_name(v)}")
    return v


def _get_ram(ctx: Ctx, t: Mapping[str, object], key: str, where: str, default: int) -> int:
    if key not in t:
        return default
    try:
        n = parse_size(t[key])
    except ConfigError as e:
        raise ctx.error(f"{where}.{key}", str(e)) from None
    if n <= 0:
        raise ctx.error(f"{where}.{key}", f"size must be positive, got {t[key]!r}")
    if n % _PAGE:
        raise ctx.error(f"{where}.{key}", f"size {t[key]!r} is not a multiple of 4096 bytes")
    return n


def _get_seconds(ctx: Ctx, t: Mapping[str, object], key: str, where: str, default: float) -> float:
    v = t.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ctx.error(f"{where}.{key}", f"expected a number of seconds, got {type_name(v)}")
    f = float(v)
    if not (f > 0 and f != float("inf")):
        raise ctx.error(f"{where}.{key}", f"must be a positive number of seconds, got {v!r}")
    return f


def _parse_device(ctx: Ctx, d: object, where: str, card: str) -> DeviceConfig:
    if not isinstance(d, dict):
        raise ctx.error(where, f"expected a table, got {type_name(d)}")
    _unknown(ctx, where, d, _DEVICE_KEYS)
    if "type" not in d:
        raise ctx.error(f"{where}.type", "required key is missing")
    dtype = d["type"]
    if not isinstance(dtype, str):
        raise ctx.error(f"{where}.type", f"expected a string, got {type_name(dtype)}")
    if not TYPE_RE.match(dtype):
        raise ctx.error(
            f"{where}.type", f"bad device type {dtype!r}: expected lower-case letters, digits, _ -"
        )
    name = d.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise ctx.error(f"{where}.name", f"expected a string, got {type_name(name)}")
        if not _DEVICE_NAME_RE.match(name):
            raise ctx.error(
                f"{where}.name",
                f"bad device name {name!r}: 1-32 letters, digits, '_', '.', '-'",
            )
    options = d.get("options", {})
    if not isinstance(options, dict):
        raise ctx.error(f"{where}.options", f"expected a table, got {type_name(options)}")
    return DeviceConfig(
        type=dtype,
        name=name,
        options=check_options(ctx, f"{where}.options", dtype, options, card),
    )


def _parse_card(ctx: Ctx, c: object, where: str) -> CardConfig:
    if not isinstance(c, dict):
        raise ctx.error(where, f"expected a table, got {type_name(c)}")
    _unknown(ctx, where, c, _CARD_KEYS)
    if "name" not in c:
        raise ctx.error(f"{where}.name", "required key is missing")
    name = c["name"]
    if not isinstance(name, str):
        raise ctx.error(f"{where}.name", f"expected a string, got {type_name(name)}")
    if not CARD_NAME_RE.match(name):
        raise ctx.error(f"{where}.name", f"bad card name {name!r}: must match ^mic[0-9]+$")
    d = CardConfig(name=name)
    hb_int = _get_seconds(ctx, c, "heartbeat_interval", where, d.heartbeat_interval)
    hb_to = _get_seconds(ctx, c, "heartbeat_timeout", where, d.heartbeat_timeout)
    if hb_to <= hb_int:
        raise ctx.error(
            f"{where}.heartbeat_timeout",
            f"must exceed heartbeat_interval ({hb_to} <= {hb_int})",
        )
    raw_devices = c.get("devices", [])
    if not isinstance(raw_devices, list):
        raise ctx.error(
            f"{where}.devices", f"expected an array of tables, got {type_name(raw_devices)}"
        )
    devices = tuple(
        _parse_device(ctx, dev, f"{where}.devices[{j}]", name) for j, dev in enumerate(raw_devices)
    )
    cmd = c.get("card_command", [])
    if not isinstance(cmd, list) or not all(isinstance(a, str) and a for a in cmd):
        raise ctx.error(f"{where}.card_command", "expected an array of non-empty strings")
    seen: dict[str, int] = {}
    for j, dev in enumerate(devices):
        if dev.name is None:
            continue
        if dev.name in seen:
            raise ctx.error(
                f"{where}.devices[{j}].name",
                f"duplicate device name {dev.name!r} (also devices[{seen[dev.name]}])",
            )
        seen[dev.name] = j
    card_ram = _get_ram(ctx, c, "card_ram", where, d.card_ram)
    host_ram = _get_ram(ctx, c, "host_ram", where, d.host_ram)
    bad = _card_problem(card_ram, host_ram, devices)
    if bad is not None:
        raise ctx.error(f"{where}.{bad[0]}", bad[1])
    return CardConfig(
        name=name,
        boot_at_start=_get_bool(ctx, c, "boot_at_start", where, d.boot_at_start),
        card_ram=card_ram,
        host_ram=host_ram,
        heartbeat_interval=hb_int,
        heartbeat_timeout=hb_to,
        boot_timeout=_get_seconds(ctx, c, "boot_timeout", where, d.boot_timeout),
        shutdown_timeout=_get_seconds(ctx, c, "shutdown_timeout", where, d.shutdown_timeout),
        used_ring_in_card=_get_bool(ctx, c, "used_ring_in_card", where, d.used_ring_in_card),
        devices=devices,
        card_command=tuple(cmd),
    )


def _parse(text: str, ctx: Ctx) -> DaemonConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ctx.error("", f"invalid TOML: {e}") from e
    _unknown(ctx, "", doc, _TOP_KEYS)
    version = doc.get("version", 1)
    if isinstance(version, bool) or version != 1:
        raise ctx.error("version", f"unsupported config version {version!r} (only 1 exists)")
    raw_cards = doc.get("cards")
    if raw_cards is None:
        raise ctx.error("cards", "no cards: add at least one [[cards]] table")
    if not isinstance(raw_cards, list):
        raise ctx.error(
            "cards", f"expected an array of tables ([[cards]]), got {type_name(raw_cards)}"
        )
    if not raw_cards:
        raise ctx.error("cards", "no cards: add at least one [[cards]] table")
    cards = tuple(_parse_card(ctx, c, f"cards[{i}]") for i, c in enumerate(raw_cards))
    first: dict[str, int] = {}
    for i, c in enumerate(cards):
        if c.name in first:
            raise ctx.error(
                f"cards[{i}].name", f"duplicate card name {c.name!r} (also cards[{first[c.name]}])"
            )
        first[c.name] = i
    return DaemonConfig(cards=cards, state_dir=ctx.state_dir, source=ctx.source)


def parse_config(
    text: str,
    source: str = "<embedded default>",
    *,
    state_dir: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None = None,
) -> DaemonConfig:
    """Parse configuration text.

    ``source`` names the text in error messages; ``state_dir`` fills the
    ``{state_dir}`` placeholder; relative paths resolve against ``base_dir``
    (default: ``state_dir``). Nothing is created on disk.

    Raises:
        ConfigError: "<source>: <key path>: <problem>" for any invalid input.
    """
    sd = Path(state_dir).expanduser().absolute()
    base = Path(base_dir).expanduser().absolute() if base_dir is not None else sd
    return _parse(text, Ctx(source, sd, base))


def load_config(path: str | os.PathLike[str], *, state_dir: str | os.PathLike[str]) -> DaemonConfig:
    """Read and parse the TOML file at ``path``; relative paths in it resolve against its directory.

    Raises:
        ConfigError: unreadable file, invalid TOML or invalid content (the
            message starts with the file name).
    """
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: config is not UTF-8: {e}") from e
    return parse_config(text, str(p), state_dir=state_dir, base_dir=p.absolute().parent)


def default_config(state_dir: str | os.PathLike[str]) -> DaemonConfig:
    """The embedded default (:data:`DEFAULT_CONFIG_TOML`) for ``state_dir``."""
    return parse_config(DEFAULT_CONFIG_TOML, state_dir=state_dir)
