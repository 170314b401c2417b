"""A card's devices as ``micctl devices`` and ``status --json`` show them: host view + card view.

Owns how the two halves of a device are joined: the host's entry (host
name, backend type; from the card's :class:`~mic_host.card.devices.DeviceSet`)
and what the card OS reported of it (its name such as ``vda``, the bound
driver's registered name, the binding state, the probe error, the app
holding a claim; from the ``online``/``devices``/``devices_changed`` link
messages), matched by device-page offset.

The card's half is untrusted: only fields of the expected type are kept and
strings are cut to a bound, so a card cannot make a status answer large or
malformed. Pure functions, no I/O; imports nothing of the daemon but types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mic_host.config import DeviceConfig

__all__ = ["CARD_FIELDS", "card_fields", "device_rows"]

#: what the card reports of each device, as ``micctl devices`` shows it
CARD_FIELDS = ("driver", "state", "error", "holder")
_MAX_TEXT = 500  # a card's error message beyond this is cut


def _text(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value if len(value) <= _MAX_TEXT else value[:_MAX_TEXT] + " [truncated]"


def card_fields(card_dev: Mapping[str, Any] | None) -> dict[str, Any]:
    """``driver``, ``state``, ``error``, ``holder`` of one device as the card reported
    it (None for each when the card did not, e.g. while it is not online)."""
    if card_dev is None:
        return dict.fromkeys(CARD_FIELDS)
    return {k: _text(card_dev.get(k)) for k in CARD_FIELDS}


def device_rows(
    named: Sequence[tuple[str, DeviceConfig]],
    offsets: Mapping[str, int],
    card_devices: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """One row per device: ``device`` (the card's name), ``name`` (host name),
    ``type``, ``type_id`` (virtio device ID), and :data:`CARD_FIELDS`.

    ``named``: the host's devices in order; ``offsets``: host name -> its
    device-page offset (running card only); ``card_devices``: the card's list.
    A device the card reports that the host does not know is listed too (name
    None), so nothing the card sees is hidden.
    """
    by_offset = {d.get("offset"): d for d in card_devices}
    rows: list[dict[str, Any]] = []
    matched: set[int] = set()
    for name, cfg in named:
        off = offsets.get(name)
        card_dev = by_offset.get(off) if off is not None else None
        if off is not None and card_dev is not None:
            matched.add(off)
        rows.append(_row(name, cfg.type, card_dev))
    for d in card_devices:
        off = d.get("offset")
        if isinstance(off, int) and off not in matched:
            rows.append(_row(None, None, d))
    return rows


def _row(name: str | None, htype: str | None, card_dev: Mapping[str, Any] | None) -> dict[str, Any]:
    type_id = card_dev.get("type") if card_dev is not None else None
    type_id = type_id if type(type_id) is int else None
    return {
        "device": _text(card_dev.get("name")) if card_dev is not None else None,
        "name": name,
        "type": htype
        if htype is not None
        else (f"type {type_id}" if type_id is not None else None),
        "type_id": type_id,
    } | card_fields(card_dev)
