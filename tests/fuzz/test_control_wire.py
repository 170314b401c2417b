"""Fuzz the control socket's codec (:mod:`mic_host.control.wire`), both directions.

Any local user can write a line to ``control.sock``, and a client reads what
the daemon (or whatever listens there) answers. ``decode_request`` must return
a :class:`Request` or raise :class:`BadRequest` (with an int id or None, so the
server can answer); ``decode_response`` a :class:`Response` or a
:class:`RemoteProtocolError`. Nothing else may escape: the server task of that
connection, or the client's reader, would die with it.
"""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from mic_host.control import wire
from mic_host.events import Event
from tests.fuzz.strategies import FUZZ, JSON, RAW_TEXTS, dumps, edits
from virtio.errors import MicError, RemoteProtocolError

VALID_REQUESTS: list[dict[str, Any]] = [
    {"id": 1, "op": "ping"},
    {"id": 2, "op": "status", "card": "mic0"},
    {"id": 3, "op": "boot", "card": "mic0", "wait": True, "timeout": 30},
    {"id": 4, "op": "wait", "card": "mic0", "state": "online", "timeout": None},
    {"id": 5, "op": "attach", "card": "mic0", "type": "block", "options": {"size": "1M"}},
    {"id": 6, "op": "run", "card": "mic0", "app": "mod.sub:fn", "args": [1, "x"]},
    {"id": 7, "op": "exec", "card": "mic0", "argv": ["ls", "/"], "max_output": 100},
    {"id": 8, "op": "console_resize", "card": "mic0", "cols": 80, "rows": 24},
    {"id": 9, "op": "net", "card": "mic0", "link": "down"},
]
VALID_RESPONSES: list[dict[str, Any]] = [
    {"id": 1, "ok": True, "result": {"pid": 1}},
    {"id": None, "ok": False, "error": {"type": "X", "base": "MicError", "message": "m"}},
    {"id": 2, "ok": False, "error": {"type": "RemoteProtocolError", "message": "m"}},
]


def request(line: bytes) -> None:
    try:
        req = wire.decode_request(line)
    except wire.BadRequest as e:
        bad: wire.BadRequest | None = e
    else:
        bad = None
    if bad is not None:
        assert bad.id is None or (isinstance(bad.id, int) and not isinstance(bad.id, bool))
        # the server answers it: the error line must encode
        assert wire.encode_error(bad.id, wire.WireError.from_exception(bad)).endswith(b"\n")
        return
    assert req.op in wire.OPS
    # a request that decoded is one a client could have sent
    again = wire.encode_request(req.id, req.op, req.card, **req.args)
    assert wire.decode_request(again) == req


def response(line: bytes) -> None:
    try:
        resp = wire.decode_response(line)
    except RemoteProtocolError:
        return
    if resp.ok:
        assert isinstance(resp.unwrap(), dict)
    else:
        assert resp.error is not None
        assert isinstance(resp.error.exception(), MicError)


def stream_line(line: bytes) -> None:
    """What a client reads: a response or a stream line, or the remote error."""
    try:
        got = wire.decode_line(line)
    except RemoteProtocolError:
        return
    if isinstance(got, wire.StreamLine):
        assert (got.item is None) != (got.end is None)
        for ev in (got.item,):
            if ev is not None:
                with contextlib.suppress(ValueError):  # the client's one parse error
                    Event.from_wire(ev)


def both(line: bytes) -> None:
    request(line)
    response(line)
    stream_line(line)


def test_valid_lines_decode() -> None:
    """The oracle's baseline: the valid requests and responses are accepted as such."""
    for obj in VALID_REQUESTS:
        assert wire.decode_request(dumps(obj).encode() + b"\n").id == obj["id"]
    for obj in VALID_RESPONSES:
        assert wire.decode_response(dumps(obj).encode()).id == obj["id"]


@FUZZ
@given(st.binary(max_size=512))
@example(b"\n")
@example(b"\xc0\x80")
def test_arbitrary_bytes(line: bytes) -> None:
    both(line)


@FUZZ
@given(RAW_TEXTS)
def test_raw_texts(text: str) -> None:
    both(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(JSON)
def test_any_json_value(value: Any) -> None:
    both(dumps(value).encode())


@FUZZ
@given(st.sampled_from(VALID_REQUESTS).flatmap(edits))
def test_valid_request_with_one_field_edited(obj: dict[str, Any]) -> None:
    request(dumps(obj).encode() + b"\n")


@FUZZ
@given(st.sampled_from(VALID_RESPONSES).flatmap(edits))
def test_valid_response_with_one_field_edited(obj: dict[str, Any]) -> None:
    response(dumps(obj).encode())


@FUZZ
@given(
    st.sampled_from(sorted(wire.OPS)),
    st.one_of(st.none(), st.text(max_size=8), JSON),
    st.dictionaries(
        st.sampled_from(sorted({a for s in wire.OPS.values() for a in s.args} | {"bogus"})),
        JSON,
        max_size=4,
    ),
    st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False), JSON),
)
def test_every_op_any_arguments(op: str, card: Any, args: dict[str, Any], rid: Any) -> None:
    """Each op's argument checks (kinds, choices, patterns, bounds) against any value."""
    obj = {"id": rid, "op": op, **({} if card is None else {"card": card}), **args}
    try:
        line = dumps(obj).encode()
    except ValueError:  # infinities: the raw-text target sends those
        return
    request(line)


def test_oversized_line_is_refused() -> None:
    line = b'{"id":1,"op":"ping","pad":"' + b"x" * wire.MAX_MESSAGE + b'"}'
    request(line)
    response(line)
