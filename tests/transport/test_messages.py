"""The host <-> card control-link messages (transport/messages.py) and the link's JSON decoder.

Sans-IO: every message class goes through ``encode`` -> JSON bytes ->
``transport.link.decode_body`` -> ``decode_from_card``/``decode_from_host``
and comes back equal; everything malformed the peer can send raises
RemoteProtocolError, never anything else.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, get_args

import pytest

from transport.link import decode_body
from transport.messages import (
    AppsReply,
    AppsRequest,
    CardMessage,
    Crashed,
    DevicesChanged,
    DevicesReply,
    DevicesRequest,
    Heartbeat,
    HostMessage,
    KillApp,
    NetParams,
    NetParamsReply,
    Online,
    Run,
    RunResult,
    Shutdown,
    ShutdownStatusReport,
    decode_from_card,
    decode_from_host,
    encode,
    reply_type,
)
from virtio.errors import LocalProtocolError, RemoteProtocolError, WireError

DEVICES = [{"name": "vda", "type": 2, "features": 3}, {"name": "hvc0", "type": 3}]

FROM_CARD: list[CardMessage] = [
    Online(devices=DEVICES),
    Online(devices=[]),
    Heartbeat(uptime=12.5),
    Heartbeat(uptime=3),
    DevicesReply(id=7, devices=DEVICES),
    RunResult(id=1, app="apps:main", ok=True, result={"answer": [42, "x", None]}),
    RunResult(id=2, app="apps:main", ok=True),
    RunResult(
        id=3,
        app="apps:boom",
        ok=False,
        error=WireError("BadRequest", "LocalProtocolError", "no such file"),
    ),
    RunResult(
        id=5,
        app="apps:boom",
        ok=False,
        error=WireError("KeyError", "InternalError", "'missing'"),
        traceback='Traceback (most recent call last):\n  File "apps.py", line 3\n',
    ),
    NetParamsReply(id=4),
    ShutdownStatusReport(status="poweroff"),
    Crashed(error="Traceback ..."),
    AppsReply(id=6, apps=[{"id": 1, "app": "apps:main", "started": 1.5, "elapsed": 0.2}]),
    AppsReply(id=7, apps=[]),
    DevicesChanged(devices=DEVICES),
]
FROM_HOST: list[HostMessage] = [
    Shutdown(),
    Shutdown(status="restart"),
    DevicesRequest(id=9),
    Run(id=10, app="apps:main", args=[1, "two", {"three": 3}]),
    Run(id=11, app="apps:main"),
    NetParams(id=12, net=[{"mac": "52:54:00:12:34:56", "mtu": 1500}]),
    Run(
        id=13,
        app="apps:main",
        args=[],
        code={"module": "apps", "modules": []},
        tag="client-1-2",
    ),
    AppsRequest(id=14),
    KillApp(id=15, app=3),
    KillApp(id=16, tag="client-1-2"),
]

#: values of the wrong type for each declared field type
WRONG: dict[str, list[Any]] = {
    "str": [1, None, ["x"], {"x": 1}],
    "int": ["1", 1.0, True, None],
    "float": ["1.5", True, None, [1.0]],
    "bool": [1, "true", None],
    "list[Any]": [{}, "[]", None],
    "list[dict[str, Any]]": [{}, [1], ["x"], [[]], None],
    "WireError | None": ["boom", 1, [], {"type": 1, "message": "m"}, {"message": "m"}],
    "Any": [],
    "str | None": [1, ["x"], {"x": 1}],
    "int | None": ["1", 1.0, True],
    "dict[str, Any] | None": ["{}", [], 1],
}


def wire(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` as the peer's link delivers it: JSON bytes through the link's decoder."""
    return decode_body(json.dumps(obj).encode())


def ids(msg: object) -> str:
    return type(msg).__name__


def test_the_examples_cover_every_message_class() -> None:
    assert {type(m) for m in FROM_CARD} == set(get_args(CardMessage))
    assert {type(m) for m in FROM_HOST} == set(get_args(HostMessage))


@pytest.mark.parametrize("msg", FROM_CARD, ids=ids)
def test_card_messages_round_trip(msg: CardMessage) -> None:
    obj = encode(msg)
    assert next(iter(obj)) == "type"
    assert obj["type"] == msg.TYPE
    assert decode_from_card(wire(obj)) == msg


@pytest.mark.parametrize("msg", FROM_HOST, ids=ids)
def test_host_messages_round_trip(msg: HostMessage) -> None:
    obj = encode(msg)
    assert obj["type"] == msg.TYPE
    assert decode_from_host(wire(obj)) == msg


def test_encoded_forms() -> None:
    assert encode(Heartbeat(uptime=1.5)) == {"type": "heartbeat", "uptime": 1.5}
    assert encode(RunResult(id=2, app="a:b", ok=True)) == {
        "type": "run_result",
        "id": 2,
        "app": "a:b",
        "ok": True,
    }
    failed = RunResult(id=3, app="a:b", ok=False, error=WireError("E", "MicError", "m"))
    assert encode(failed)["error"] == {"type": "E", "base": "MicError", "message": "m"}
    assert encode(Shutdown()) == {"type": "shutdown", "status": "halted"}
    assert encode(Run(id=1, app="a:b")) == {"type": "run", "id": 1, "app": "a:b", "args": []}
    assert encode(KillApp(id=2, tag="t")) == {"type": "kill-app", "id": 2, "tag": "t"}


def test_optional_fields_take_their_defaults() -> None:
    assert decode_from_host({"type": "shutdown"}) == Shutdown(status="halted")
    assert decode_from_host({"type": "run", "id": 1, "app": "a:b"}) == Run(id=1, app="a:b")
    assert decode_from_card({"type": "run_result", "id": 1, "app": "a:b", "ok": True}) == (
        RunResult(id=1, app="a:b", ok=True, result=None, error=None)
    )
    null_error = {"type": "run_result", "id": 1, "app": "a:b", "ok": False, "error": None}
    with pytest.raises(RemoteProtocolError, match="carries no error"):
        decode_from_card(null_error)  # a failure must say what failed


def test_a_decoded_error_is_a_wire_error() -> None:
    obj = {"type": "run_result", "id": 1, "app": "a:b", "ok": False}
    obj["error"] = {"type": "ConfigError", "message": "bad"}
    msg = decode_from_card(wire(obj))
    assert isinstance(msg, RunResult)
    assert msg.error == WireError("ConfigError", "ConfigError", "bad")


def test_encode_refuses_what_is_not_a_link_message() -> None:
    with pytest.raises(LocalProtocolError):
        encode({"type": "heartbeat", "uptime": 1.0})  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        encode(WireError("a", "b", "c"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"type": None},
        {"type": 1},
        {"type": ["heartbeat"]},
        {"type": "HEARTBEAT", "uptime": 1.0},
        {"type": "reboot"},
        {"type": "run", "id": 1, "app": "a:b"},  # a host message, coming from the card
        {"type": "shutdown"},
    ],
)
def test_an_unknown_type_from_the_card(obj: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown message type"):
        decode_from_card(obj)


@pytest.mark.parametrize(
    "obj",
    [
        {"uptime": 1.0},
        {"type": "heartbeat", "uptime": 1.0},  # a card message, coming from the host
        {"type": "online", "devices": []},
        {"type": "net-params", "id": 1},  # the card's reply shape, not the host's request
    ],
)
def test_an_unknown_type_from_the_host(obj: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_from_host(obj)


def _cases() -> list[Any]:
    cases = []
    for n, (msg, decode) in enumerate(
        [*((m, decode_from_card) for m in FROM_CARD), *((m, decode_from_host) for m in FROM_HOST)]
    ):
        name = f"{n}{type(msg).__name__}"
        good = encode(msg)
        for f in dataclasses.fields(msg):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                bad = {k: v for k, v in good.items() if k != f.name}
                cases.append(pytest.param(decode, bad, id=f"{name}-missing-{f.name}"))
            for i, value in enumerate(WRONG[str(f.type)]):
                bad = good | {f.name: value}
                cases.append(pytest.param(decode, bad, id=f"{name}-{f.name}-wrong{i}"))
        cases.append(pytest.param(decode, good | {"extra": 1}, id=f"{name}-extra-field"))
        cases.append(pytest.param(decode, good | {"TYPE": msg.TYPE}, id=f"{name}-TYPE-field"))
    return cases


@pytest.mark.parametrize(("decode", "obj"), _cases())
def test_a_missing_mistyped_or_extra_field_is_the_peers_fault(
    decode: Any, obj: dict[str, Any]
) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(wire(obj))


# ---------------------------------------------------------- the link's JSON


def test_decode_body_returns_the_object() -> None:
    assert decode_body(b'{"type": "heartbeat", "uptime": 1}') == {"type": "heartbeat", "uptime": 1}


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": "heartbeat", "type": "crashed", "error": "x"}',
        b'{"type": "online", "devices": [{"name": "vda", "name": "vdb"}]}',
        b'{"a": {"b": {"c": 1, "c": 1}}}',
    ],
)
def test_decode_body_refuses_duplicate_keys(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="duplicate key") as info:
        decode_body(body)
    assert info.value.reason == "json"


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000,
        b"[" * 200_000 + b"]" * 200_000,
        b'{"a": ' * 200_000 + b"1" + b"}" * 200_000,
        b'{"type": "online", "devices": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    ],
    ids=["open", "closed", "objects", "inside-a-message"],
)
def test_decode_body_refuses_deep_nesting(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(body)
    assert info.value.reason == "json"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'"heartbeat"',
        b"1",
        b"null",
        b'{"uptime": NaN}',
        b'{"uptime": Infinity}',
        b'{"uptime": -Infinity}',
        b'{"type": "\xff"}',
    ],
)
def test_decode_body_refuses_what_is_not_a_json_object(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_body(body)


def test_run_result_errors_in_the_one_wire_form_and_the_old_one() -> None:
    err = WireError.from_exception(KeyError("k"))
    msg = decode_from_card(encode(RunResult(id=1, app="a", ok=False, error=err)))
    assert isinstance(msg, RunResult)
    assert msg.error == err
    # today's card sends {type, message}: base defaults to the type
    old = decode_from_card(
        {
            "type": "run_result",
            "id": 1,
            "app": "a",
            "ok": False,
            "error": {"type": "MicTimeoutError", "message": "slow"},
        }
    )
    assert isinstance(old, RunResult)
    assert old.error is not None
    assert (old.error.type, old.error.base, old.error.message) == (
        "MicTimeoutError",
        "MicTimeoutError",
        "slow",
    )
    with pytest.raises(RemoteProtocolError, match="error object"):
        decode_from_card(
            {
                "type": "run_result",
                "id": 1,
                "app": "a",
                "ok": False,
                "error": {"type": "X", "message": "m", "trace": "..."},
            }
        )


def test_direction_matters() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown message type 'run'"):
        decode_from_card(encode(Run(id=1, app="a")))
    with pytest.raises(RemoteProtocolError, match="unknown message type 'online'"):
        decode_from_host(encode(Online(devices=[])))


@pytest.mark.parametrize(
    ("obj", "decode", "match"),
    [
        ({"type": "run_result", "id": 1, "app": "a", "ok": False}, decode_from_card, "no error"),
        (
            {
                "type": "run_result",
                "id": 1,
                "app": "a",
                "ok": True,
                "error": {"type": "X", "message": "m"},
            },
            decode_from_card,
            "carries an error",
        ),
    ],
)
def test_contradictory_fields_are_the_peers_fault(obj: Any, decode: Any, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode(obj)


def test_the_link_refuses_numbers_that_overflow_to_infinity() -> None:
    with pytest.raises(RemoteProtocolError, match="out of range"):
        decode_body(b'{"type": "heartbeat", "uptime": 1e400}')
    assert decode_body(b'{"uptime": 1.5e300}') == {"uptime": 1.5e300}


def test_a_kill_names_one_app() -> None:
    for obj in ({"type": "kill-app", "id": 1}, {"type": "kill-app", "id": 1, "app": 2, "tag": "t"}):
        with pytest.raises(RemoteProtocolError, match="exactly one of app and tag"):
            decode_from_host(wire(obj))
    assert reply_type(KillApp(id=1, app=2)) is AppsReply
    assert reply_type(AppsRequest(id=1)) is AppsReply
