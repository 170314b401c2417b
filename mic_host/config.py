"""The mic-host daemon's configuration: a TOML file, parsed into frozen values.

Owns the schema, its validation (every error names the file, the key path and
the problem), size strings (``"64M"``), the embedded default configuration and
the default state directory. Imports ``tomllib`` and ``virtio.errors`` only; no
asyncio, no ``transport``. The daemon, ``micctl`` and the client library read
their defaults from here so they agree.

Schema (also in ``docs/cli.md``)::

    version = 1                      # optional; only 1 exists

    [[cards]]                        # one table per card, at least one
    name = "mic0"                    # required, ^mic[0-9]+$, unique
    boot_at_start = true             # boot when the daemon starts (default false)
    card_ram = "64M"                 # card RAM (aperture) size, default 64M
    host_ram = "16M"                 # host RAM window (device page + vrings), default 16M
    heartbeat_interval = 1.0         # seconds between card heartbeats
    heartbeat_timeout = 5.0          # seconds without one before the card is "crashed"
    boot_timeout = 30.0              # booting -> online bound, else "reset_failed"
    shutdown_timeout = 10.0          # shutting_down -> ready bound before a forced reset
    used_ring_in_card = true         # let the card move used rings into card RAM
    card_command = ["strace", "-f"]  # optional: wrap the card OS (a debugger, a tracer...);
                                     # the daemon appends: python -m mic_card --socket S --card N

    [[cards.devices]]                # zero or more, in device-page order
    type = "block"                   # "block", "console", "net" or a registered backend
    name = "root"                    # optional label, unique per card
    options = { image = "{state_dir}/mic0.img", size = "64M", create = true }

Sizes are byte counts or strings with a binary suffix (``K``, ``M``, ``G``,
``T``, optionally followed by ``iB`` or ``B``): ``65536``, ``"64K"``,
``"1GiB"``. RAM sizes must be positive multiples of 4096. Durations are
positive numbers of seconds, and ``heartbeat_timeout`` must exceed
``heartbeat_interval``.

Device options are checked for the built-in types (see :data:`DEVICE_OPTIONS`);
options of other (plug-in) types pass through untouched for their backend to
check. In string options of kind ``path``/``str`` the placeholders
``{state_dir}`` and ``{card}`` are expanded at load time, and relative paths
are resolved against the config file's directory (the state directory for the
embedded default).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mic_host.paths import STATE_DIR_ENV, default_state_dir, resolve_state_dir
from virtio.errors import ConfigError

__all__ = [
    "CardConfig",
    "DaemonConfig",
    "DeviceConfig",
    "OptionSpec",
    "DEVICE_OPTIONS",
    "DEFAULT_CONFIG_TOML",
    "CARD_NAME_RE",
    "STATE_DIR_ENV",
    "default_state_dir",
    "resolve_state_dir",
    "load_config",
    "parse_config",
    "default_config",
    "parse_size",
    "format_size",
    "validate_device_options",
    "check_device_types",
]

CARD_NAME_RE = re.compile(r"^mic[0-9]+$")
_DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_PAGE = 4096
#: virtio-blk's GET_ID answer is 20 bytes (virtio 1.2 §5.2.6)
_SERIAL_MAX = 20

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


# --------------------------------------------------------------------- sizes

_SIZE_RE = re.compile(r"^\s*([0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: object) -> int:
    """Parse a byte count: an int, or a string like ``"4096"``, ``"64M"``, ``"1GiB"``.

    Units are binary (K = 1024). Returns a non-negative int; callers check
    their own lower bound.

    Raises:
        ConfigError: not an int or a size string, or negative (the message
            has no key path; :func:`parse_config` adds it).
    """
    if isinstance(value, bool):
        raise ConfigError(f"bad size {value!r}: expected bytes or a string like '64M'")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"bad size {value}: must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m is None or (m.group(3) and not m.group(2) and m.group(3).lower() == "ib"):
            raise ConfigError(
                f"bad size {value!r}: expected bytes or a number with K, M, G or T "
                "(binary units), e.g. '64M'"
            )
        return int(m.group(1)) * _UNITS[m.group(2).lower()]
    raise ConfigError(
        f"bad size {value!r}: expected bytes (int) or a string like '64M', "
        f"not {type(value).__name__}"
    )


def format_size(n: int) -> str:
    """The shortest exact binary-unit spelling: ``67108864 -> '64M'``, ``1000 -> '1000'``."""
    for unit in ("T", "G", "M", "K"):
        mult = _UNITS[unit.lower()]
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


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


# ------------------------------------------------------------ device options

OptionKind = Literal["str", "path", "bool", "int", "size", "mac", "serial"]


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One known option of a device type: its kind, whether it is required, a help line."""

    kind: OptionKind
    required: bool = False
    help: str = ""


#: Known options of the built-in device types. A plug-in backend may add its
#: own entry (``DEVICE_OPTIONS["mytype"] = {...}``) before configs are parsed;
#: types without an entry pass their options through unchecked.
DEVICE_OPTIONS: dict[str, dict[str, OptionSpec]] = {
    "block": {
        "image": OptionSpec("path", required=True, help="backing file"),
        "size": OptionSpec("size", help="size of the image to create"),
        "create": OptionSpec("bool", help="create the image (sparse, `size` bytes) if missing"),
        "read_only": OptionSpec("bool", help="offer VIRTIO_BLK_F_RO; writes fail"),
        "serial": OptionSpec("serial", help="answer to GET_ID, at most 20 bytes"),
        "num_queues": OptionSpec("int", help="request queues, 1..4 (> 1 offers VIRTIO_BLK_F_MQ)"),
        "queue_size": OptionSpec("int", help="entries per queue, a power of two <= 256"),
        "blk_size": OptionSpec("size", help="logical block size, a power of two 512..64K"),
        "discard": OptionSpec("bool", help="offer DISCARD and WRITE_ZEROES (default true)"),
    },
    "console": {},
    "net": {
        "backend": OptionSpec("str", help='"tap" (a host TAP, as mpssd; needs root) or "switch"'),
        "mac": OptionSpec("mac", help="card-side MAC address, aa:bb:cc:dd:ee:ff"),
        "mtu": OptionSpec(
            "int", help="MTU offered with VIRTIO_NET_F_MTU (68..65535, default 1500)"
        ),
        "ifname": OptionSpec("str", help="tap: host TAP name (default the card name)"),
        "host_ip": OptionSpec(
            "str",
            help="address/len of the host TAP (tap, default 172.31.N+1.254/24) "
            "or of the switch's uplink TAP (default 172.31.255.254/24)",
        ),
        "card_ip": OptionSpec("str", help="card address/len (tap default 172.31.N+1.1/24)"),
        "netns": OptionSpec(
            "str", help="existing namespace for the host TAP (tap) or the switch's uplink TAP"
        ),
        "card_netns": OptionSpec(
            "str", help="namespace the card's TAP lives in (default the card)"
        ),
        "card_mode": OptionSpec("str", help='card side: "auto", "tap" (needs root) or "frames"'),
        "switch": OptionSpec("str", help='switch: name of the switch to join (default "sw0")'),
        "uplink": OptionSpec("str", help="switch: a host TAP to attach to the switch"),
        "backlog": OptionSpec(
            "int", help="switch: frames kept while the card posts no buffers (default 256)"
        ),
    },
}


class _Ctx:
    """Where we are: the source (file) and base directory, for messages and paths."""

    __slots__ = ("base_dir", "source", "state_dir")

    def __init__(self, source: str, state_dir: Path, base_dir: Path) -> None:
        self.source = source
        self.state_dir = state_dir
        self.base_dir = base_dir

    def error(self, key: str, problem: str) -> ConfigError:
        where = f"{self.source}: {key}" if key else self.source
        return ConfigError(f"{where}: {problem}")


def _type_name(v: object) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        dict: "table",
    }.get(type(v), type(v).__name__)


def _expand(ctx: _Ctx, key: str, text: str, card: str) -> str:
    values = {"state_dir": str(ctx.state_dir), "card": card}

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise ctx.error(key, f"unknown placeholder {{{name}}} (known: {{state_dir}}, {{card}})")
        return values[name]

    return _PLACEHOLDER_RE.sub(sub, text)


def _check_option(ctx: _Ctx, key: str, spec: OptionSpec, value: object, card: str) -> object:
    kind = spec.kind
    if kind in ("str", "path", "serial", "mac"):
        if not isinstance(value, str):
            raise ctx.error(key, f"expected a string, got {_type_name(value)}")
        if kind == "str":
            return _expand(ctx, key, value, card)
        if kind == "path":
            if not value:
                raise ctx.error(key, "empty path")
            p = Path(_expand(ctx, key, value, card)).expanduser()
            return str(p if p.is_absolute() else ctx.base_dir / p)
        if kind == "serial":
            if len(value.encode()) > _SERIAL_MAX:
                raise ctx.error(key, f"serial {value!r} is longer than {_SERIAL_MAX} bytes")
            return value
        if not _MAC_RE.match(value):
            raise ctx.error(key, f"bad MAC address {value!r}: expected aa:bb:cc:dd:ee:ff")
        return value.lower()
    if kind == "bool":
        if not isinstance(value, bool):
            raise ctx.error(key, f"expected true or false, got {_type_name(value)}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(key, f"expected an integer, got {_type_name(value)}")
        if value <= 0:
            raise ctx.error(key, f"must be positive, got {value}")
        return value
    # size
    try:
        n = parse_size(value)
    except ConfigError as e:
        raise ctx.error(key, str(e)) from None
    if n <= 0:
        raise ctx.error(key, f"size must be positive, got {value!r}")
    return n


def _check_options(
    ctx: _Ctx, key: str, dtype: str, options: Mapping[str, object], card: str
) -> dict[str, Any]:
    specs = DEVICE_OPTIONS.get(dtype)
    if specs is None:
        return dict(options)
    out: dict[str, Any] = {}
    for name, value in options.items():
        spec = specs.get(name)
        if spec is None:
            known = ", ".join(sorted(specs)) or "none"
            raise ctx.error(f"{key}.{name}", f"unknown option for {dtype} devices (known: {known})")
        out[name] = _check_option(ctx, f"{key}.{name}", spec, value, card)
    for name, spec in specs.items():
        if spec.required and name not in out:
            raise ctx.error(f"{key}.{name}", f"required option of {dtype} devices is missing")
    if dtype == "block" and out.get("create") and "size" not in out:
        raise ctx.error(f"{key}.size", "create = true needs a size")
    if dtype == "net":
        _check_net(ctx, key, out)
    return out


_NET_CHOICES = {"backend": ("tap", "switch"), "card_mode": ("auto", "tap", "frames")}
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _check_net(ctx: _Ctx, key: str, out: dict[str, Any]) -> None:
    """Values of net options that their kind alone does not check."""
    import ipaddress

    for name, choices in _NET_CHOICES.items():
        if name in out and out[name] not in choices:
            raise ctx.error(
                f"{key}.{name}", f"expected one of {', '.join(choices)}, got {out[name]!r}"
            )
    for name in ("host_ip", "card_ip"):
        if name in out:
            try:
                iface = ipaddress.ip_interface(out[name])
            except ValueError:
                raise ctx.error(
                    f"{key}.{name}", f"bad address {out[name]!r}: expected A.B.C.D/len"
                ) from None
            if "/" not in out[name]:
                out[name] = str(iface)  # e.g. 10.0.0.1 -> 10.0.0.1/32
    for name in ("ifname", "netns", "card_netns", "switch", "uplink"):
        if name in out and not _IFNAME_RE.match(out[name]):
            raise ctx.error(f"{key}.{name}", f"bad name {out[name]!r}: 1..15 of A-Z a-z 0-9 _ . -")
    if "mtu" in out and not 68 <= out["mtu"] <= 65535:
        raise ctx.error(f"{key}.mtu", f"MTU {out['mtu']} outside 68..65535")
    if "backlog" in out and out["backlog"] < 1:
        raise ctx.error(f"{key}.backlog", f"backlog {out['backlog']} is not >= 1")


def validate_device_options(
    dtype: str,
    options: Mapping[str, object],
    *,
    state_dir: str | os.PathLike[str],
    card: str,
    source: str = "attach",
    key: str = "options",
) -> dict[str, Any]:
    """Check and normalise ``options`` of a device of type ``dtype`` (for hot-attach).

    The same rules as the config file: sizes become ints, paths are expanded
    and made absolute (relative to ``state_dir``). Unknown types pass through.

    Raises:
        ConfigError: "<source>: <key>.<option>: <problem>".
    """
    sd = Path(state_dir)
    if not _TYPE_RE.match(dtype):
        raise ConfigError(f"{source}: type: bad device type {dtype!r}")
    return _check_options(_Ctx(source, sd, sd), key, dtype, options, card)


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


def _unknown(ctx: _Ctx, prefix: str, table: Mapping[str, object], known: set[str]) -> None:
    for k in table:
        if k not in known:
            where = f"{prefix}.{k}" if prefix else k
            raise ctx.error(where, f"unknown key (known: {', '.join(sorted(known))})")


def _get_bool(ctx: _Ctx, t: Mapping[str, object], key: str, where: str, default: bool) -> bool:
    v = t.get(key, default)
    if not isinstance(v, bool):
        raise ctx.error(f"{where}.{key}", f"expected true or false, got {_type_name(v)}")
    return v


def _get_ram(ctx: _Ctx, t: Mapping[str, object], key: str, where: str, default: int) -> int:
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


def _get_seconds(ctx: _Ctx, t: Mapping[str, object], key: str, where: str, default: float) -> float:
    v = t.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ctx.error(f"{where}.{key}", f"expected a number of seconds, got {_type_name(v)}")
    f = float(v)
    if not (f > 0 and f != float("inf")):
        raise ctx.error(f"{where}.{key}", f"must be a positive number of seconds, got {v!r}")
    return f


def _parse_device(ctx: _Ctx, d: object, where: str, card: str) -> DeviceConfig:
    if not isinstance(d, dict):
        raise ctx.error(where, f"expected a table, got {_type_name(d)}")
    _unknown(ctx, where, d, _DEVICE_KEYS)
    if "type" not in d:
        raise ctx.error(f"{where}.type", "required key is missing")
    dtype = d["type"]
    if not isinstance(dtype, str):
        raise ctx.error(f"{where}.type", f"expected a string, got {_type_name(dtype)}")
    if not _TYPE_RE.match(dtype):
        raise ctx.error(
            f"{where}.type", f"bad device type {dtype!r}: expected lower-case letters, digits, _ -"
        )
    name = d.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise ctx.error(f"{where}.name", f"expected a string, got {_type_name(name)}")
        if not _DEVICE_NAME_RE.match(name):
            raise ctx.error(
                f"{where}.name",
                f"bad device name {name!r}: 1-32 letters, digits, '_', '.', '-'",
            )
    options = d.get("options", {})
    if not isinstance(options, dict):
        raise ctx.error(f"{where}.options", f"expected a table, got {_type_name(options)}")
    return DeviceConfig(
        type=dtype,
        name=name,
        options=_check_options(ctx, f"{where}.options", dtype, options, card),
    )


def _parse_card(ctx: _Ctx, c: object, where: str) -> CardConfig:
    if not isinstance(c, dict):
        raise ctx.error(where, f"expected a table, got {_type_name(c)}")
    _unknown(ctx, where, c, _CARD_KEYS)
    if "name" not in c:
        raise ctx.error(f"{where}.name", "required key is missing")
    name = c["name"]
    if not isinstance(name, str):
        raise ctx.error(f"{where}.name", f"expected a string, got {_type_name(name)}")
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
            f"{where}.devices", f"expected an array of tables, got {_type_name(raw_devices)}"
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
    return CardConfig(
        name=name,
        boot_at_start=_get_bool(ctx, c, "boot_at_start", where, d.boot_at_start),
        card_ram=_get_ram(ctx, c, "card_ram", where, d.card_ram),
        host_ram=_get_ram(ctx, c, "host_ram", where, d.host_ram),
        heartbeat_interval=hb_int,
        heartbeat_timeout=hb_to,
        boot_timeout=_get_seconds(ctx, c, "boot_timeout", where, d.boot_timeout),
        shutdown_timeout=_get_seconds(ctx, c, "shutdown_timeout", where, d.shutdown_timeout),
        used_ring_in_card=_get_bool(ctx, c, "used_ring_in_card", where, d.used_ring_in_card),
        devices=devices,
        card_command=tuple(cmd),
    )


def _parse(text: str, ctx: _Ctx) -> DaemonConfig:
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
            "cards", f"expected an array of tables ([[cards]]), got {_type_name(raw_cards)}"
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
    return _parse(text, _Ctx(source, sd, base))


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
