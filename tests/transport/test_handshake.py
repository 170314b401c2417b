"""The PCIe handshake messages (transport.handshake): round trips and refusals, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from transport.errors import HandshakeError
from transport.handshake import PROTOCOL, CardIdentity, Hello, Offer, Ready, Refuse
from transport.mmio import MmioLayout


def _offer() -> Offer:
    return Offer(
        card=CardIdentity("mic3", node_id=4),
        regions={"card_ram": 1 << 20, "host_ram": 2 << 20, "mmio": MmioLayout().size},
        layout=MmioLayout(),
        max_message=4096,
        boot={"node_id": 4, "net": []},
    )


def test_round_trips() -> None:
    for hello in (Hello(), Hello(card="mic1")):
        assert Hello.from_wire(hello.to_wire()) == hello
    offer = _offer()
    wire = offer.to_wire()
    assert wire["fds"][:3] == ["card_ram", "host_ram", "mmio"]
    assert len(wire["fds"]) == 3 + offer.layout.card_vectors + offer.layout.host_vectors
    assert Offer.from_wire(wire) == offer
    assert Ready.from_wire(Ready().to_wire()) == Ready()
    refusal = Refuse("identity", "not you")
    assert refusal.to_wire()["versions"] == [1]
    assert Refuse.from_wire(refusal.to_wire()) == refusal
    assert Refuse.from_wire({"type": "ready"}) is None
    assert Refuse.from_wire({"type": "refuse"}) == Refuse("refused", "None")


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"type": "hello", "protocol": "other", "version": 1}, "protocol"),
        ({"type": "ready", "protocol": PROTOCOL, "version": 1}, "protocol"),
        ({"type": "hello", "protocol": PROTOCOL, "version": 99}, "version"),
        ({"type": "hello", "protocol": PROTOCOL, "version": True}, "version"),
        ({"type": "hello", "protocol": PROTOCOL, "version": 1, "card": 5}, "malformed"),
    ],
)
def test_hello_refusals(obj: dict[str, Any], reason: str) -> None:
    with pytest.raises(HandshakeError) as e:
        Hello.from_wire(obj)
    assert e.value.reason == reason


def _bad_offer(**change: Any) -> dict[str, Any]:
    wire = _offer().to_wire()
    for k, v in change.items():
        if v is None:
            del wire[k]
        else:
            wire[k] = v
    return wire


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (_bad_offer(protocol="x"), "protocol"),
        # a peer of another version hears "version", whatever else its frame lacks
        ({"type": "offer", "protocol": PROTOCOL, "version": 2}, "version"),
        (_bad_offer(card=None), "malformed"),
        (_bad_offer(card={"name": "mic0"}), "malformed"),
        (_bad_offer(layout={"doorbells": 1}), "malformed"),
        (_bad_offer(regions={"card_ram": 100, "host_ram": 4096, "mmio": 4096}), "malformed"),
        (_bad_offer(max_message=10**9), "malformed"),
        (_bad_offer(boot=[1]), "malformed"),
    ],
)
def test_offer_refusals(obj: dict[str, Any], reason: str) -> None:
    with pytest.raises(HandshakeError) as e:
        Offer.from_wire(obj)
    assert e.value.reason == reason


def test_ready_must_be_of_our_version() -> None:
    with pytest.raises(HandshakeError, match="expected ready"):
        Ready.from_wire({"type": "ready", "version": 2})
