"""The control-link messages (transport.messages): round trips and every refusal, no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from transport.link import decode_body
from transport.messages import (
    Crashed,
    DevicesReply,
    DevicesRequest,
    Heartbeat,
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
)
from virtio.errors import LocalProtocolError, RemoteProtocolError, WireError

DEV = {"name": "vda", "offset": 24, "type": 2, "state": "live"}

FROM_CARD = [
    Online(devices=[DEV]),
    Heartbeat(uptime=1.5),
    Heartbeat(uptime=3),
    DevicesReply(id=7, devices=[DEV, {"name": "hvc0", "offset": 200}]),
    RunResult(id=1, app="m:f", ok=True, result={"x": [1, 2]}),
    RunResult(id=2, app="m:f", ok=False, error=WireError("ValueError", "InternalError", "bad")),
    NetParamsReply(id=3),
    ShutdownStatusReport(status="poweroff"),
    Crashed(error="boom"),
]
FROM_HOST = [
    Shutdown(),
    Shutdown(status="restart"),
    DevicesRequest(id=4),
    Run(id=5, app="tests.apps:echo", args=[1, "a", None]),
    Run(id=6, app="m:f"),
    NetParams(id=8, net=[{"mac": "02:00:00:00:00:01", "mode": "tap"}]),
]


def _wire(obj: dict[str, Any]) -> dict[str, Any]:
    """What the peer receives: the object through JSON and the link's decoder."""
    return decode_body(json.dumps(obj).encode())


@pytest.mark.parametrize("msg", FROM_CARD, ids=lambda m: type(m).__name__)
def test_card_messages_round_trip(msg: Any) -> None:
    obj = encode(msg)
    assert next(iter(obj)) == "type"
    assert obj["type"] == msg.TYPE
    assert decode_from_card(_wire(obj)) == msg


@pytest.mark.parametrize("msg", FROM_HOST, ids=lambda m: type(m).__name__)
def test_host_messages_round_trip(msg: Any) -> None:
    obj = encode(msg)
    assert obj["type"] == msg.TYPE
    assert decode_from_host(_wire(obj)) == msg


def test_optional_fields_are_left_out_and_defaulted() -> None:
    assert encode(RunResult(id=1, app="a", ok=True)) == {
        "type": "run_result",
        "id": 1,
        "app": "a",
        "ok": True,
    }
    assert decode_from_host({"type": "shutdown"}) == Shutdown(status="halted")
    assert decode_from_host({"type": "run", "id": 1, "app": "a"}).args == []  # type: ignore[union-attr]


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
    ("obj", "match"),
    [
        ({"type": "no such message"}, "unknown message type"),
        ({"no": "type at all"}, "unknown message type None"),
        ({"type": 5}, "unknown message type 5"),
        ({"type": "heartbeat"}, "lacks 'uptime'"),
        ({"type": "run_result", "id": 999, "ok": True, "result": 1}, "lacks 'app'"),
        ({"type": "heartbeat", "uptime": "forever"}, "must be a number"),
        ({"type": "heartbeat", "uptime": True}, "must be a number"),
        ({"type": "devices", "id": "x", "devices": []}, "must be an integer"),
        ({"type": "devices", "id": True, "devices": []}, "must be an integer"),
        ({"type": "devices", "id": 1, "devices": {"not": "a list"}}, "list of objects"),
        ({"type": "online", "devices": [1, "x"]}, "list of objects"),
        ({"type": "run_result", "id": 1, "app": "a", "ok": 1}, "true or false"),
        ({"type": "crashed", "error": {"type": "X"}}, "must be a string"),
        ({"type": "heartbeat", "uptime": 1, "extra": 2}, "unknown fields"),
    ],
)
def test_what_a_card_may_not_send(obj: dict[str, Any], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_from_card(obj)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"type": "run", "id": 1}, "lacks 'app'"),
        ({"type": "run", "id": 1, "app": "a", "args": "x"}, "must be a list"),
        ({"type": "net-params", "id": 1, "net": [1]}, "list of objects"),
        ({"type": "shutdown", "status": None}, "must be a string"),
        ({"type": "devices"}, "lacks 'id'"),
    ],
)
def test_what_a_host_may_not_send(obj: dict[str, Any], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_from_host(obj)


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(LocalProtocolError):
        encode({"type": "heartbeat"})  # type: ignore[arg-type]


def test_the_link_refuses_duplicate_keys_and_deep_nesting() -> None:
    with pytest.raises(RemoteProtocolError, match="duplicate key 'type'"):
        decode_body(b'{"type": "heartbeat", "uptime": 1, "type": "crashed"}')
    with pytest.raises(RemoteProtocolError, match="duplicate key"):
        decode_body(b'{"type": "online", "devices": [{"name": "a", "name": "b"}]}')
    deep = b'{"type": "online", "devices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(RemoteProtocolError, match="too deeply"):
        decode_body(deep)
    with pytest.raises(RemoteProtocolError, match="not an object"):
        decode_body(b"[1]")
