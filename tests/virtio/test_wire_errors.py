"""The one error wire form, ``{"type", "base", "message"}`` (virtio.errors.WireError).

Sans-IO: exceptions in, JSON-able dicts out, and back. Everything the peer
sends either parses or raises RemoteProtocolError (STYLE.md §3).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from virtio.errors import (
    INTERNAL_ERROR,
    MAX_WIRE_MESSAGE,
    BrokenResourceError,
    ClosedResourceError,
    ConfigError,
    EndOfStream,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    ProtocolError,
    RemoteProtocolError,
    ResourceError,
    WireError,
    WouldBlock,
)

MODULE_CLASSES: list[type[MicError]] = [
    MicError,
    ProtocolError,
    LocalProtocolError,
    RemoteProtocolError,
    ResourceError,
    ClosedResourceError,
    BrokenResourceError,
    WouldBlock,
    EndOfStream,
    MicTimeoutError,
    ConfigError,
]


def through_the_wire(exc: BaseException) -> MicError:
    """What the peer raises after ``exc`` went through JSON."""
    sent = json.dumps(WireError.from_exception(exc).to_wire())
    return WireError.from_wire(json.loads(sent)).exception()


@pytest.mark.parametrize("cls", MODULE_CLASSES, ids=lambda c: c.__name__)
def test_each_project_error_comes_back_as_itself(cls: type[MicError]) -> None:
    wire = WireError.from_exception(cls("it broke"))
    assert wire.to_wire() == {"type": cls.__name__, "base": cls.__name__, "message": "it broke"}
    back = through_the_wire(cls("it broke"))
    assert type(back) is cls
    assert str(back) == "it broke"


def test_a_subclass_travels_with_its_name_and_comes_back_as_its_nearest_base() -> None:
    class BadRequest(LocalProtocolError):
        pass

    class LinkGone(BrokenResourceError):
        pass

    assert WireError.from_exception(BadRequest("no such op")).to_wire() == {
        "type": "BadRequest",
        "base": "LocalProtocolError",
        "message": "no such op",
    }
    assert type(through_the_wire(BadRequest("x"))) is LocalProtocolError
    assert type(through_the_wire(LinkGone("x"))) is BrokenResourceError


def test_a_foreign_class_that_borrows_a_project_name_is_not_taken_for_it() -> None:
    class ConfigError(LocalProtocolError):  # same name as virtio.errors.ConfigError
        pass

    wire = WireError.from_exception(ConfigError("x"))
    assert (wire.type, wire.base) == ("ConfigError", "LocalProtocolError")


def test_a_remote_protocol_error_gets_the_receivers_reason() -> None:
    wire = WireError.from_exception(RemoteProtocolError("bad frame", reason="json"))
    back = wire.exception(reason="card")
    assert isinstance(back, RemoteProtocolError)
    assert back.reason == "card"
    assert WireError.from_wire(wire.to_wire()).exception().reason == "peer"  # type: ignore[attr-defined]


def test_a_builtin_timeout_travels_as_mic_timeout() -> None:
    wire = WireError.from_exception(TimeoutError("slow"))
    assert (wire.type, wire.base, wire.message) == ("MicTimeoutError", "MicTimeoutError", "slow")
    back = wire.exception()
    assert isinstance(back, MicTimeoutError)
    assert isinstance(back, TimeoutError)


@pytest.mark.parametrize("exc", [ValueError("bug"), KeyError("k"), KeyboardInterrupt()])
def test_anything_else_is_an_internal_error(exc: BaseException) -> None:
    wire = WireError.from_exception(exc)
    assert wire.type == type(exc).__name__
    assert wire.base == INTERNAL_ERROR
    back = wire.exception()
    assert type(back) is MicError
    assert str(back) == wire.message


def test_message_override_empty_message_and_truncation() -> None:
    assert WireError.from_exception(ValueError("secret"), "failed").message == "failed"
    assert WireError.from_exception(EndOfStream()).message == "EndOfStream"
    exact = "x" * MAX_WIRE_MESSAGE
    assert WireError.from_exception(MicError(exact)).message == exact
    cut = WireError.from_exception(MicError(exact + "y")).message
    assert cut == exact + " [truncated]"


def test_from_wire_defaults_base_to_type() -> None:
    assert WireError.from_wire({"type": "WouldBlock", "message": "m"}) == WireError(
        "WouldBlock", "WouldBlock", "m"
    )


def test_unknown_names_fall_back_to_base_then_to_mic_error() -> None:
    assert type(WireError("Odd", "ResourceError", "m").exception()) is ResourceError
    assert type(WireError("Odd", "Stranger", "m").exception()) is MicError
    # a builtin's name is not one of ours: never turned into that builtin
    assert type(WireError("SystemExit", "SystemExit", "m").exception()) is MicError


@pytest.mark.parametrize(
    "obj",
    [
        None,
        "LocalProtocolError",
        ["type", "message"],
        {},
        {"type": "MicError"},
        {"message": "m"},
        {"type": 1, "message": "m"},
        {"type": "MicError", "message": None},
        {"type": "MicError", "base": 3, "message": "m"},
        {"type": "MicError", "base": None, "message": "m"},
        {"type": "MicError", "message": "m", "trace": "..."},
    ],
)
def test_a_malformed_error_object_is_the_peers_fault(obj: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        WireError.from_wire(obj)


def test_wire_error_is_a_frozen_value() -> None:
    wire = WireError("a", "b", "c")
    with pytest.raises(AttributeError):
        wire.type = "d"  # type: ignore[misc]
    assert wire == WireError("a", "b", "c")
    assert hash(wire) == hash(WireError("a", "b", "c"))
