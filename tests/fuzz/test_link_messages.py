"""Fuzz the control link's decoders: frame body -> JSON object -> typed message.

A card OS (or the host) can put any bytes in a frame body. ``decode_body``
followed by ``decode_from_card`` / ``decode_from_host`` must return a message or
raise :class:`RemoteProtocolError`; a ``RecursionError``, ``TypeError`` or
``KeyError`` escaping would kill the daemon's session task for that card
(issue 14, item 2).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.strategies import FUZZ, JSON, RAW_TEXTS, dumps, edits
from transport import messages as m
from transport.link import decode_body
from virtio.errors import RemoteProtocolError, WireError

_ERR = WireError("ValueError", "InternalError", "boom")

#: One valid instance of every message, each way.
CARD_MESSAGES: list[m.CardMessage] = [
    m.Online([{"name": "vda", "offset": 24}]),
    m.Heartbeat(1.5),
    m.DevicesReply(3, [{"name": "hvc0"}]),
    m.RunResult(4, "mod:fn", True, {"value": 1}),
    m.RunResult(5, "mod:fn", False, error=_ERR),
    m.NetParamsReply(6),
    m.ShutdownStatusReport("halted"),
    m.Crashed("oops"),
    m.DevicesChanged([{"name": "vda", "offset": 24, "state": "failed"}]),
]
HOST_MESSAGES: list[m.HostMessage] = [
    m.Shutdown("poweroff"),
    m.DevicesRequest(7),
    m.Run(8, "mod:fn", [1, "a", None]),
    m.NetParams(9, [{"mac": "02:00:00:00:00:01"}]),
]
VALID = [m.encode(x) for x in [*CARD_MESSAGES, *HOST_MESSAGES]]


def decode_all(body: bytes) -> None:
    """The reader's pipeline: the invariant is 'a message or RemoteProtocolError'."""
    try:
        obj = decode_body(body)
    except RemoteProtocolError:
        return
    assert isinstance(obj, dict)
    decode_obj(obj)


def decode_obj(obj: dict[str, Any]) -> None:
    for decode, kinds in ((m.decode_from_card, CardKinds), (m.decode_from_host, HostKinds)):
        try:
            msg = decode(obj)
        except RemoteProtocolError:
            continue
        assert isinstance(msg, kinds)
        # what decoded re-encodes to a message that decodes to the same value
        assert decode(m.encode(msg)) == msg


CardKinds = (
    m.Online,
    m.Heartbeat,
    m.DevicesReply,
    m.RunResult,
    m.NetParamsReply,
    m.ShutdownStatusReport,
    m.Crashed,
    m.DevicesChanged,
)
HostKinds = (m.Shutdown, m.DevicesRequest, m.Run, m.NetParams)


@pytest.mark.parametrize("msg", [*CARD_MESSAGES, *HOST_MESSAGES], ids=lambda x: type(x).__name__)
def test_valid_messages_round_trip(msg: Any) -> None:
    """The fuzz oracle's baseline: every valid message survives encode -> bytes -> decode."""
    body = dumps(m.encode(msg)).encode()
    decode = m.decode_from_card if isinstance(msg, CardKinds) else m.decode_from_host
    assert decode(decode_body(body)) == msg


@FUZZ
@given(st.binary(max_size=512))
@example(b"\xff\xfe")
@example(b'{"type":"heartbeat","uptime":1}')
def test_arbitrary_bytes(body: bytes) -> None:
    decode_all(body)


@FUZZ
@given(RAW_TEXTS)
def test_raw_texts(text: str) -> None:
    decode_all(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(JSON)
def test_any_json_value(value: Any) -> None:
    decode_all(dumps(value).encode())


@FUZZ
@given(st.sampled_from(VALID).flatmap(edits))
def test_valid_message_with_one_field_edited(obj: dict[str, Any]) -> None:
    decode_all(dumps(obj).encode())


@FUZZ
@given(
    st.sampled_from(sorted({str(v["type"]) for v in VALID} | {"", "x", "ONLINE"})),
    st.dictionaries(st.sampled_from(["id", "devices", "uptime", "app", "ok", "result", "error",
                                     "status", "args", "net", "extra"]), JSON, max_size=6),
)  # fmt: skip
def test_right_type_tag_any_fields(kind: str, fields: dict[str, Any]) -> None:
    """A known ``type`` with random fields: the validation paths of every message."""
    decode_obj({"type": kind, **fields})


@FUZZ
@given(
    st.sampled_from(sorted({str(v["type"]) for v in VALID})),
    st.sampled_from(["id", "uptime"]),
    st.one_of(
        st.integers(min_value=-(2**200), max_value=2**200),
        st.floats(),
        st.booleans(),
        st.just("1"),
    ),
)
def test_numbers_huge_negative_float(kind: str, name: str, value: Any) -> None:
    obj = next((dict(v) for v in VALID if v["type"] == kind), {"type": kind})
    obj[name] = value
    try:
        text = dumps(obj)
    except ValueError:  # NaN/inf: the raw-text target sends those
        return
    decode_all(text.encode())


@FUZZ
@given(
    st.sampled_from(["error"]),
    st.one_of(JSON, st.dictionaries(st.sampled_from(["type", "base", "message", "x"]), JSON)),
)
def test_run_result_error_objects(name: str, error: Any) -> None:
    decode_obj({"type": "run_result", "id": 1, "app": "a:b", "ok": False, name: error})
