"""A card's devices as ``micctl devices`` and ``status --json`` show them: host view + card view.

Owns how the two halves of a device are joined: the host's entry (host
name, backend type; from the card's :class:`~mic_host.card.devices.DeviceSet`)
and what the card OS reported of it (its name such as ``vda``, the bound
driver's registered name, the binding state, the probe error, the app
holding a claim; from the ``online``/``devices``/``devices_changed`` link
messages), matched by device-page offset.

The card's half is untrusted: only fields of the expected type are kept and
strings are cut to a bound, so a card cannot make a status answer large or
malformed. :func:`devices_report` is the ``devices`` control op (the card
manager is seen through the :class:`DevicesSource` protocol, so this module
does not import it); the rest are pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from mic_host.card.devices import DeviceSet
from mic_host.config import DeviceConfig
from mic_host.lifecycle import CardState
from mic_host.vop import Vop

__all__ = [
    "CARD_FIELDS",
    "DevicesSource",
    "card_fields",
    "card_info",
    "device_rows",
    "devices_report",
]

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


def card_info(
    vop: Vop | None, card_devices: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Host device name -> :func:`card_fields` of what the card reported of it."""
    by_offset = {d.get("offset"): d for d in card_devices}
    offsets = {n: d.view.offset for n, d in vop.devices.items()} if vop is not None else {}
    return {n: card_fields(by_offset.get(off)) for n, off in offsets.items()}


class DevicesSource(Protocol):
    """What :func:`devices_report` reads of a card (``mic_host.card.CardManager``)."""

    name: str
    device_set: DeviceSet

    @property
    def state(self) -> CardState: ...

    @property
    def vop(self) -> Vop | None: ...

    @property
    def card_devices(self) -> list[dict[str, Any]]: ...

    async def refresh_devices(self) -> list[dict[str, Any]]: ...


async def devices_report(card: DevicesSource) -> dict[str, Any]:
    """The ``devices`` op: ``{"card", "state", "devices": rows}`` (:func:`device_rows`).
    An online card is asked for its current list first; a card that is not
    running shows the host's devices only (the card fields None).

    Raises:
        MicTimeoutError: an online card did not answer within 10 s.
    """
    if card.state is CardState.ONLINE:
        await card.refresh_devices()
    vop = card.vop
    if vop is None:  # not running: the host's devices, nothing from a card
        return {"card": card.name, "state": str(card.state),
                "devices": device_rows(card.device_set.named(), {}, [])}  # fmt: skip
    offsets = {n: d.view.offset for n, d in vop.devices.items()}
    rows = device_rows(card.device_set.named(), offsets, card.card_devices)
    return {"card": card.name, "state": str(card.state), "devices": rows}


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
