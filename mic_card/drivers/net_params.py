"""A card NIC's boot parameters and mode: which entry is its own, tap or frames, what to ack.

The card learns each NIC's address, namespace and mode from
``boot_params["net"]`` (an entry per NIC, matched by MAC; the daemon sends a
hot-added NIC's entry just before the device appears, merged with
:func:`merge_params`). :func:`plan` decides tap or frames mode, and
:func:`consistent` drops feature bits whose prerequisites are missing
(virtio 1.2 §5.1.3.1).

Used by :mod:`mic_card.drivers.net`; imports ``virtio`` (and ``transport.tap``
lazily, on the tap path only). Never imports the shell or the card OS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from virtio.constants import NetFeature
from virtio.errors import LocalProtocolError
from virtio.net import DEVICE_FEATURES, parse_config, parse_mac, random_mac

if TYPE_CHECKING:
    from mic_card.bus import CardDevice

__all__ = [
    "FRAMES_FEATURES",
    "consistent",
    "entry_for",
    "feature_names",
    "merge_params",
    "param_mac",
    "plan",
]

_GUEST_OFFLOADS = (
    NetFeature.GUEST_CSUM | NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6 | NetFeature.GUEST_ECN
)
#: Frames mode: apps get complete frames, so no receive offloads. (Tap mode
#: supports everything the device offers, ``virtio.net.DEVICE_FEATURES``.)
FRAMES_FEATURES = int(DEVICE_FEATURES) & ~int(_GUEST_OFFLOADS)

# Feature dependencies (virtio 1.2 §5.1.3.1): (bit, needs any of).
_DEPENDS = (
    (NetFeature.GUEST_TSO4, NetFeature.GUEST_CSUM),
    (NetFeature.GUEST_TSO6, NetFeature.GUEST_CSUM),
    (NetFeature.GUEST_ECN, NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6),
    (NetFeature.HOST_TSO4, NetFeature.CSUM),
    (NetFeature.HOST_TSO6, NetFeature.CSUM),
    (NetFeature.HOST_ECN, NetFeature.HOST_TSO4 | NetFeature.HOST_TSO6),
)


def consistent(features: int) -> int:
    """Drop bits whose prerequisites are missing (§5.1.3.1), in dependency order."""
    for bit, needs in _DEPENDS:
        if features & bit and not features & needs:
            features &= ~int(bit)
    return features


def feature_names(bits: int) -> list[str]:
    return [f.name or "" for f in NetFeature if bits & f]


def _entry_mac(entry: Any) -> bytes | None:
    if not isinstance(entry, dict):
        return None
    try:
        return parse_mac(str(entry.get("mac", "")))
    except LocalProtocolError:
        return None


def merge_params(known: list[Any], entries: list[Any]) -> None:
    """Merge hot-added NICs' parameters into ``boot_params["net"]`` in place:
    an entry replaces any earlier one with the same MAC (a NIC detached and
    attached again under the same name keeps its derived MAC, not its old
    address or mode)."""
    new = [e for e in entries if isinstance(e, dict)]
    macs = {m for m in map(_entry_mac, new) if m is not None}
    known[:] = [k for k in known if _entry_mac(k) not in macs] + new


def entry_for(dev: CardDevice, mac: bytes) -> dict[str, Any] | None:
    """This NIC's ``bus.params["net"]`` entry (matched by MAC), or None."""
    entries = getattr(dev.bus, "params", {}).get("net") or []
    for e in entries:
        if not isinstance(e, dict):
            continue
        try:
            if parse_mac(str(e.get("mac", ""))) == mac:
                return e
        except LocalProtocolError:
            continue
    return None


def plan(dev: CardDevice) -> tuple[dict[str, Any] | None, str, str | None]:
    """(boot entry, planned mode "tap"/"frames", why not tap when tap was asked for).

    Raises:
        RemoteProtocolError: the config space is too short.
    """
    mac = parse_config(dev.read_config()).mac
    entry = entry_for(dev, mac)
    if entry is None:
        return None, "frames", None
    mode = str(entry.get("mode") or "auto")
    if mode == "frames":
        return entry, "frames", None
    if mode not in ("auto", "tap"):
        return entry, "frames", f"unknown mode {mode!r}"
    from transport.tap import tap_privilege_problem

    problem = tap_privilege_problem()
    if problem is None:
        return entry, "tap", None
    return entry, "frames", problem if mode == "tap" else None


def param_mac(entry: dict[str, Any], name: str) -> bytes:
    """MAC not negotiated: the boot parameter's, else a stable random one."""
    try:
        return parse_mac(str(entry["mac"]))
    except (KeyError, LocalProtocolError):
        return random_mac(name.encode())
