"""Device options: the known options of each built-in device type and their checks.

Owns :data:`DEVICE_OPTIONS` (kind, required, help per option), the checks
and normalisation of option values (sizes to ints, placeholders ``{state_dir}``
and ``{card}`` expanded, paths made absolute, net addresses and names), and
:func:`validate_device_options` for hot-attach. The config file parser
(:mod:`mic_host.config.schema`) checks device tables with the same code
through :class:`Ctx`. Block options are bounded by
:mod:`mic_host.config.limits` (imported when a block device is checked) and
an existing image checked by :mod:`mic_host.config.files`. Imports those,
``mic_host.config.sizes`` and ``virtio.errors``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mic_host.config.files import probe_image
from mic_host.config.sizes import parse_size
from virtio.errors import ConfigError

__all__ = [
    "DEVICE_OPTIONS",
    "TRANSPORT_OPTIONS",
    "TRANSPORT_OPTION_NAMES",
    "OptionKind",
    "OptionSpec",
    "Ctx",
    "TYPE_RE",
    "check_options",
    "type_name",
    "validate_device_options",
]

TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
#: virtio-blk's GET_ID answer is 20 bytes (virtio 1.2 §5.2.6)
_SERIAL_MAX = 20

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
        "image": OptionSpec("path", help="backing file (required unless backend is vhost-user)"),
        "size": OptionSpec("size", help="size of the image to create"),
        "create": OptionSpec("bool", help="create the image (sparse, `size` bytes) if missing"),
        "read_only": OptionSpec("bool", help="offer VIRTIO_BLK_F_RO; writes fail"),
        "serial": OptionSpec("serial", help="answer to GET_ID, at most 20 bytes"),
        "num_queues": OptionSpec("int", help="request queues, 1..4 (> 1 offers VIRTIO_BLK_F_MQ)"),
        "queue_size": OptionSpec("int", help="entries per queue, a power of two 4..256"),
        "blk_size": OptionSpec("size", help="logical block size, a power of two 512..64K"),
        "discard": OptionSpec("bool", help="offer DISCARD and WRITE_ZEROES (default true)"),
        "force_share": OptionSpec(
            "bool",
            help="open the image even if another card, daemon or QEMU holds it "
            "(QEMU's share-rw: only when the writers cannot collide)",
        ),
        "backend": OptionSpec(
            "str",
            help='"file" (default: MIC-VOP serves `image`) or "vhost-user" (an external '
            "back-end such as qemu-storage-daemon serves the card's rings; docs/vhost-user.md)",
        ),
        "socket": OptionSpec("path", help="vhost-user: the back-end's Unix socket"),
        "data_path": OptionSpec(
            "str",
            help='"cpu" (default: preadv/pwritev straight into card memory), "dma" (the '
            'card\'s DMA engine through a host bounce buffer) or "auto" (DMA at or above '
            "dma_threshold); docs/block.md",
        ),
        "dma_threshold": OptionSpec(
            "size", help='data_path = "auto": requests of at least this size use DMA'
        ),
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


#: Options every device type takes (built-in or plug-in): how VOP carries the
#: device, not what the backend does. The daemon takes them out of the
#: options before the backend sees them (:data:`TRANSPORT_OPTION_NAMES`).
TRANSPORT_OPTIONS: dict[str, OptionSpec] = {
    "ring": OptionSpec(
        "str",
        help='virtqueue layout: "split" (default) or "packed" (offers VIRTIO_F_RING_PACKED)',
    ),
}
TRANSPORT_OPTION_NAMES = frozenset(TRANSPORT_OPTIONS)
_RING_CHOICES = ("split", "packed")


class Ctx:
    """Where we are: the source (file) and base directory, for messages and paths."""

    __slots__ = ("base_dir", "source", "state_dir")

    def __init__(self, source: str, state_dir: Path, base_dir: Path) -> None:
        self.source = source
        self.state_dir = state_dir
        self.base_dir = base_dir

    def error(self, key: str, problem: str) -> ConfigError:
        where = f"{self.source}: {key}" if key else self.source
        return ConfigError(f"{where}: {problem}")


def type_name(v: object) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        dict: "table",
    }.get(type(v), type(v).__name__)


def _expand(ctx: Ctx, key: str, text: str, card: str) -> str:
    values = {"state_dir": str(ctx.state_dir), "card": card}

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise ctx.error(key, f"unknown placeholder {{{name}}} (known: {{state_dir}}, {{card}})")
        return values[name]

    return _PLACEHOLDER_RE.sub(sub, text)


def _check_option(ctx: Ctx, key: str, spec: OptionSpec, value: object, card: str) -> object:
    kind = spec.kind
    if kind in ("str", "path", "serial", "mac"):
        if not isinstance(value, str):
            raise ctx.error(key, f"expected a string, got {type_name(value)}")
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
            raise ctx.error(key, f"expected true or false, got {type_name(value)}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(key, f"expected an integer, got {type_name(value)}")
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


def _check_transport(ctx: Ctx, key: str, options: Mapping[str, object]) -> dict[str, Any]:
    """The :data:`TRANSPORT_OPTIONS` among ``options``, checked."""
    out: dict[str, Any] = {}
    if "ring" in options:
        ring = options["ring"]
        if ring not in _RING_CHOICES:
            raise ctx.error(
                f"{key}.ring", f"expected one of {', '.join(_RING_CHOICES)}, got {ring!r}"
            )
        out["ring"] = ring
    return out


def check_options(
    ctx: Ctx, key: str, dtype: str, options: Mapping[str, object], card: str
) -> dict[str, Any]:
    transport = _check_transport(ctx, key, options)
    specs = DEVICE_OPTIONS.get(dtype)
    if specs is None:
        return dict(options) | transport
    out: dict[str, Any] = dict(transport)
    for name, value in options.items():
        if name in TRANSPORT_OPTIONS:
            continue
        spec = specs.get(name)
        if spec is None:
            known = ", ".join(sorted({*specs, *TRANSPORT_OPTIONS})) or "none"
            raise ctx.error(f"{key}.{name}", f"unknown option for {dtype} devices (known: {known})")
        out[name] = _check_option(ctx, f"{key}.{name}", spec, value, card)
    for name, spec in specs.items():
        if spec.required and name not in out:
            raise ctx.error(f"{key}.{name}", f"required option of {dtype} devices is missing")
    if dtype == "block":
        _check_block(ctx, key, out)
    if dtype == "net":
        _check_net(ctx, key, out)
    return out


def _check_block(ctx: Ctx, key: str, out: dict[str, Any]) -> None:
    """Values of block options that their kind alone does not check, and the image."""
    # Here, not at the top: limits imports construct and transport, which micctl
    # (a user of this module) does not need to start.
    import mic_host.config.limits as lim

    if _check_block_backend(ctx, key, out):
        return
    if "data_path" in out or "dma_threshold" in out:
        _check_data_path(ctx, key, out)
    nq = out.get("num_queues", 1)
    if not 1 <= nq <= lim.BLOCK_MAX_QUEUES:
        raise ctx.error(f"{key}.num_queues", f"{nq} queues: expected 1..{lim.BLOCK_MAX_QUEUES}")
    qs = out.get("queue_size", lim.BLOCK_QUEUE_SIZE)
    if not (lim.is_power_of_two(qs) and lim.BLOCK_QUEUE_SIZE_MIN <= qs <= lim.MAX_QUEUE_SIZE):
        raise ctx.error(
            f"{key}.queue_size",
            f"{qs} entries: expected a power of two "
            f"{lim.BLOCK_QUEUE_SIZE_MIN}..{lim.MAX_QUEUE_SIZE} (the VOP limit)",
        )
    bs = out.get("blk_size", lim.BLK_SIZE_MIN)
    if not (lim.is_power_of_two(bs) and lim.BLK_SIZE_MIN <= bs <= lim.BLK_SIZE_MAX):
        raise ctx.error(
            f"{key}.blk_size",
            f"{bs} B: expected a power of two {lim.BLK_SIZE_MIN}..{lim.BLK_SIZE_MAX}",
        )
    size = out.get("size")
    if out.get("create") and size is None:
        raise ctx.error(f"{key}.size", "create = true needs a size")
    if size is not None:
        if size > lim.IMAGE_SIZE_MAX:
            raise ctx.error(
                f"{key}.size",
                f"{size} B is more than any file can hold ({lim.IMAGE_SIZE_MAX} B, an off_t)",
            )
        if size % bs:
            raise ctx.error(f"{key}.size", f"{size} B is not a whole number of {bs}-byte blocks")
    # A missing image is created at boot (create = true) or reported then: it
    # may be made between load and boot. One that exists must make a disk.
    try:
        probe_image(out["image"], bs)
    except ConfigError as e:
        raise ctx.error(f"{key}.image", str(e)) from None


def _check_data_path(ctx: Ctx, key: str, out: dict[str, Any]) -> None:
    import mic_host.config.limits as lim

    dp = out.get("data_path")  # absent: the backend's default, which is not "auto"
    if dp is not None and dp not in lim.BLOCK_DATA_PATHS:
        choices = ", ".join(lim.BLOCK_DATA_PATHS)
        raise ctx.error(f"{key}.data_path", f"expected one of {choices}, got {dp!r}")
    if "dma_threshold" in out and dp != "auto":
        raise ctx.error(f"{key}.dma_threshold", 'only a data_path = "auto" disk has a threshold')


#: the longest Unix socket path (``sun_path`` is 108 bytes with its NUL)
_SUN_PATH_MAX = 107
#: block options that only a disk MIC-VOP serves itself has (a vhost-user back-end decides)
_FILE_ONLY = (
    "image",
    "size",
    "create",
    "read_only",
    "serial",
    "num_queues",
    "blk_size",
    "discard",
    "force_share",
    "data_path",
    "dma_threshold",
)


def _check_block_backend(ctx: Ctx, key: str, out: dict[str, Any]) -> bool:
    """The ``backend`` choice and its options; True for a vhost-user disk (checked)."""
    import mic_host.config.limits as lim

    backend = out.get("backend", "file")
    if backend not in ("file", "vhost-user"):
        raise ctx.error(f"{key}.backend", f'expected "file" or "vhost-user", got {backend!r}')
    if backend == "file":
        if "socket" in out:
            raise ctx.error(f"{key}.socket", 'only a backend = "vhost-user" disk has a socket')
        if "image" not in out:
            raise ctx.error(f"{key}.image", "required option of block devices is missing")
        return False
    if "socket" not in out:
        raise ctx.error(f"{key}.socket", 'a backend = "vhost-user" disk needs the socket')
    if len(os.fsencode(out["socket"])) > _SUN_PATH_MAX:
        raise ctx.error(
            f"{key}.socket",
            f"{out['socket']!r} is longer than a Unix socket path may be ({_SUN_PATH_MAX} bytes)",
        )
    if out.get("ring") == "packed":
        raise ctx.error(
            f"{key}.ring",
            "a vhost-user disk gets split rings (qemu-storage-daemon 7.2's libvhost-user "
            "has no packed ring; docs/vhost-user.md)",
        )
    for name in _FILE_ONLY:
        if name in out:
            raise ctx.error(
                f"{key}.{name}",
                "not an option of a vhost-user disk (the back-end decides; "
                "set it on qemu-storage-daemon's export)",
            )
    qs = out.get("queue_size", lim.BLOCK_QUEUE_SIZE)
    if not (lim.is_power_of_two(qs) and lim.BLOCK_QUEUE_SIZE_MIN <= qs <= lim.MAX_QUEUE_SIZE):
        raise ctx.error(
            f"{key}.queue_size",
            f"{qs} entries: expected a power of two "
            f"{lim.BLOCK_QUEUE_SIZE_MIN}..{lim.MAX_QUEUE_SIZE} (the VOP limit)",
        )
    return True


_NET_CHOICES = {"backend": ("tap", "switch"), "card_mode": ("auto", "tap", "frames")}
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _check_net(ctx: Ctx, key: str, out: dict[str, Any]) -> None:
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
    and made absolute (relative to ``state_dir``), block options are bounded
    and an existing image must make a disk. Unknown types pass through.
    Whether the card has room for one more device is
    :func:`~mic_host.config.check_card_devices`.

    Raises:
        ConfigError: "<source>: <key>.<option>: <problem>".
    """
    sd = Path(state_dir)
    if not TYPE_RE.match(dtype):
        raise ConfigError(f"{source}: type: bad device type {dtype!r}")
    return check_options(Ctx(source, sd, sd), key, dtype, options, card)
