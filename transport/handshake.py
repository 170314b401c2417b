"""The PCIe link handshake messages (version 1): frozen dataclasses, one parser each.

The frames both sides exchange on a card's Unix socket before the control
link carries anything else (see :mod:`transport.pcie` for who sends what
when)::

    card -> host  Hello   {"type": "hello", "protocol": "mic-vop-pcie", "version": 1,
                           "card": name|null}
    host -> card  Offer   {"type": "offer", ..., "fds": [...names]}  + SCM_RIGHTS fds
    card -> host  Ready   {"type": "ready", "version": 1}
    either side   Refuse  {"type": "refuse", "reason": ..., "message": ..., "versions": [1]}

``to_wire()`` gives the frame; ``from_wire(obj)`` parses what the peer sent
and raises :class:`~transport.errors.HandshakeError` whose ``reason``
(``protocol``, ``version``, ``malformed``) is what a refusal reports: the
protocol is checked first, then the version, then the fields, so a peer of
another version hears "version" whatever else its frame holds.

Sans-IO: imports only ``transport.errors``, ``transport.mmio`` (the layout
the offer carries) and ``transport.region`` (the page size).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from transport.errors import HandshakeError
from transport.mmio import MmioLayout
from transport.region import PAGE_SIZE

__all__ = [
    "MAX_MESSAGE_CAP",
    "PROTOCOL",
    "PROTOCOL_VERSION",
    "REGIONS",
    "CardIdentity",
    "Hello",
    "Offer",
    "Ready",
    "Refuse",
]

PROTOCOL = "mic-vop-pcie"
PROTOCOL_VERSION = 1
MAX_MESSAGE_CAP = 16 << 20
#: the regions an offer hands over, in fd order (then the vectors' eventfds)
REGIONS = ("card_ram", "host_ram", "mmio")


@dataclass(frozen=True, slots=True)
class CardIdentity:
    """Who the card is (sent to the card in the handshake)."""

    name: str = "mic0"
    node_id: int = 1
    family: str = "x100"
    stepping: str = "C0"


def _int(d: Mapping[str, Any], key: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise HandshakeError(f"offer field {key!r} = {v!r} is not an integer in {lo}..{hi}",
                             reason="malformed")  # fmt: skip
    return v


def _dict(d: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key)
    if not isinstance(v, dict):
        raise HandshakeError(f"offer field {key!r} is not an object", reason="malformed")
    return v


@dataclass(frozen=True, slots=True)
class Hello:
    """The card's first frame: which protocol, which version, which card it wants."""

    card: str | None = None
    version: int = PROTOCOL_VERSION

    def to_wire(self) -> dict[str, Any]:
        return {"type": "hello", "protocol": PROTOCOL, "version": self.version, "card": self.card}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Hello:
        """Raises: HandshakeError (reason ``protocol``, ``version``, ``malformed``)."""
        if obj.get("type") != "hello" or obj.get("protocol") != PROTOCOL:
            raise HandshakeError(f"not a {PROTOCOL} hello: {str(obj)[:200]}", reason="protocol")
        version = obj.get("version")
        if version != PROTOCOL_VERSION or isinstance(version, bool):
            raise HandshakeError(
                f"version {version!r} not supported (host speaks {PROTOCOL_VERSION})",
                reason="version",
            )
        card = obj.get("card")
        if card is not None and not isinstance(card, str):
            raise HandshakeError(f"hello field 'card' = {card!r:.60} is not a string",
                                 reason="malformed")  # fmt: skip
        return cls(card=card, version=PROTOCOL_VERSION)


@dataclass(frozen=True, slots=True)
class Offer:
    """The host's answer: who the card is, the regions and layout, limits, boot
    parameters, and the names of the fds that travel with it."""

    card: CardIdentity
    regions: dict[str, int]
    layout: MmioLayout
    max_message: int
    boot: dict[str, Any]

    @property
    def fds(self) -> list[str]:
        """The fds' names, in the order they travel."""
        lay = self.layout
        return (
            [*REGIONS]
            + [f"card_vec{i}" for i in range(lay.card_vectors)]
            + [f"host_vec{i}" for i in range(lay.host_vectors)]
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "offer",
            "protocol": PROTOCOL,
            "version": PROTOCOL_VERSION,
            "card": asdict(self.card),
            "regions": dict(self.regions),
            "layout": asdict(self.layout),
            "max_message": self.max_message,
            "boot": self.boot,
            "fds": self.fds,
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Offer:
        """Raises: HandshakeError (reason ``protocol``, ``version``, ``malformed``)."""
        if obj.get("type") != "offer" or obj.get("protocol") != PROTOCOL:
            raise HandshakeError(f"not a {PROTOCOL} offer: {str(obj)[:200]}", reason="protocol")
        if obj.get("version") != PROTOCOL_VERSION:
            raise HandshakeError(f"offer version {obj.get('version')!r} not supported",
                                 reason="version")  # fmt: skip
        card = _dict(obj, "card")
        regions = _dict(obj, "regions")
        lay = _dict(obj, "layout")
        boot = _dict(obj, "boot")
        try:
            layout = MmioLayout(**{k: _int(lay, k, 1, 64) for k in MmioLayout.__dataclass_fields__})
            ident = CardIdentity(
                name=str(card["name"]),
                node_id=_int(card, "node_id", 0, 1 << 16),
                family=str(card["family"]),
                stepping=str(card["stepping"]),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise HandshakeError(f"malformed offer: {e!r}", reason="malformed") from e
        sizes = {name: _int(regions, name, PAGE_SIZE, 1 << 40) for name in REGIONS}
        max_message = _int(obj, "max_message", 64, MAX_MESSAGE_CAP)
        return cls(card=ident, regions=sizes, layout=layout, max_message=max_message, boot=boot)


@dataclass(frozen=True, slots=True)
class Ready:
    """The card mapped everything: the link is up."""

    version: int = PROTOCOL_VERSION

    def to_wire(self) -> dict[str, Any]:
        return {"type": "ready", "version": self.version}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Ready:
        """Raises: HandshakeError (reason ``protocol``)."""
        if obj.get("type") != "ready" or obj.get("version") != PROTOCOL_VERSION:
            raise HandshakeError(f"expected ready, got {str(obj)[:200]}", reason="protocol")
        return cls()


@dataclass(frozen=True, slots=True)
class Refuse:
    """Either side gives up, saying why (``reason`` is a short code)."""

    reason: str
    message: str
    versions: tuple[int, ...] = (PROTOCOL_VERSION,)

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "refuse",
            "reason": self.reason,
            "message": self.message,
            "versions": list(self.versions),
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Refuse | None:
        """The refusal in ``obj``, or None when ``obj`` is not one. Lenient: a
        peer that gives up is believed whatever its frame's other fields hold."""
        if obj.get("type") != "refuse":
            return None
        return cls(reason=str(obj.get("reason", "refused")), message=str(obj.get("message")))
