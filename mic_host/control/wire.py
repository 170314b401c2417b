"""The control socket's wire codec: requests, responses, the op table. No I/O.

The control socket (``STATE_DIR/control.sock``) is how ``micctl`` and the
client library talk to the mic-host daemon; the full description for users is
``docs/cli.md``. This module owns what travels on it and nothing else: the
table of operations and their arguments (:data:`OPS`), the request and
response values, and their encoding and validation. Errors travel in the
project's one wire form, :class:`virtio.errors.WireError`. Both sides import
it: the client (:mod:`mic_host.client`) and the server
(:mod:`mic_host.control.server`); it imports neither, nor asyncio, nor any
daemon module (only ``mic_host.lifecycle`` for the card state names,
``virtio.agent`` for one bound and ``virtio.errors``).

Wire format, one JSON object per line (UTF-8, ``\\n``-terminated, at most
:data:`MAX_MESSAGE` bytes)::

    -> {"id": 7, "op": "boot", "card": "mic0", "wait": true, "timeout": 30}
    <- {"id": 7, "ok": true, "result": {"card": "mic0", "state": "online"}}
    <- {"id": 8, "ok": false, "error": {"type": "LocalProtocolError",
        "base": "LocalProtocolError", "message": "cannot boot mic0: ..."}}

Requests on one connection are served concurrently (a long ``wait`` does not
hold up a ``status``); responses carry the request's ``id`` and may come out
of order. A line that is not a valid request gets an error response (with
``"id": null`` if no id could be read) and the connection stays usable; a line
over the size bound ends the connection, as the stream cannot be resynchronised.

Streaming ops (``events``, ``logs``; ``OpSpec.stream``) answer with their
first response as usual (the stream is set up: for ``events``, the
subscription is in place, so what the client does next is seen), then send
any number of item lines, then one end line; an error after the first
response comes as an ordinary error response with the same id::

    -> {"id": 9, "op": "events", "card": "mic0"}
    <- {"id": 9, "ok": true, "result": {"card": "mic0", "kinds": []}}
    <- {"id": 9, "item": {"event": "online", "card": "mic0", "data": {...}, ...}}
    <- {"id": 9, "end": {"reason": "daemon stopping"}}

A client ends a stream by closing its connection.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

from mic_host.events import DEFAULT_FEED
from mic_host.lifecycle import CardState
from virtio.agent import MAX_OUTPUT
from virtio.errors import (
    LocalProtocolError,
    MicError,
    RemoteProtocolError,
    WireError,
)

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_MESSAGE",
    "OPS",
    "ArgSpec",
    "OpSpec",
    "Request",
    "Response",
    "BadRequest",
    "encode_request",
    "decode_request",
    "encode_response",
    "encode_error",
    "decode_response",
    "StreamLine",
    "encode_item",
    "encode_end",
    "decode_line",
]

PROTOCOL_VERSION = 1
#: Bound on one line, newline included, both directions.
MAX_MESSAGE = 1 << 20
_MAX_ID = (1 << 53) - 1  # exact in every JSON implementation

# ------------------------------------------------------------------ the table

ArgKind = Literal["string", "boolean", "number", "object", "array"]


@dataclass(frozen=True, slots=True)
class ArgSpec:
    """One argument of an op: JSON kind, whether it is required, its default."""

    kind: ArgKind
    required: bool = False
    default: Any = None
    nullable: bool = False
    choices: tuple[str, ...] | None = None
    pattern: str | None = None
    help: str = ""


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One op: whether it takes a card (``required``/``optional``/``none``), its args."""

    card: Literal["required", "optional", "none"]
    args: Mapping[str, ArgSpec] = field(default_factory=dict)
    help: str = ""
    #: a streaming op: its handler gets a ``stream`` and answers with
    #: :func:`encode_item` lines after its first response (see the docstring)
    stream: bool = False


_TIMEOUT = ArgSpec("number", nullable=True, help="seconds; null = the card's configured bound")
_STATES = tuple(s.value for s in CardState)

#: op -> card and arguments. The handler method of the same name receives
#: ``card`` (unless ``card == "none"``) and every argument, defaults filled in.
OPS: dict[str, OpSpec] = {
    "ping": OpSpec("none", help="liveness; returns the daemon's pid and protocol version"),
    "status": OpSpec("optional", help="state of one card, or of all"),
    "boot": OpSpec(
        "required",
        {"wait": ArgSpec("boolean", default=False, help="until online"), "timeout": _TIMEOUT},
        help="ready -> booting (-> online)",
    ),
    "shutdown": OpSpec(
        "required",
        {"wait": ArgSpec("boolean", default=False, help="until ready"), "timeout": _TIMEOUT},
        help="online -> shutting_down (-> ready)",
    ),
    "reset": OpSpec("required", help="any state but ready -> resetting -> ready"),
    "wait": OpSpec(
        "required",
        {"state": ArgSpec("string", required=True, choices=_STATES), "timeout": _TIMEOUT},
        help="until the card is in a state",
    ),
    "attach": OpSpec(
        "required",
        {
            "type": ArgSpec("string", required=True, pattern=r"^[a-z][a-z0-9_-]{0,31}$"),
            "options": ArgSpec("object", default={}),
        },
        help="hot-add a device",
    ),
    "detach": OpSpec(
        "required",
        {"device": ArgSpec("string", required=True, help="card device name or label")},
        help="hot-remove a device",
    ),
    "stats": OpSpec("required", help="per-device, per-queue counters"),
    "run": OpSpec(
        "required",
        {
            "app": ArgSpec(
                "string",
                required=True,
                pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
                help="module:function on the card",
            ),
            "args": ArgSpec("array", default=[]),
            "code": ArgSpec("object", help="the app's sources (transport.appcode.AppCode)"),
            "tag": ArgSpec(
                "string", pattern=r"^[A-Za-z0-9_.:-]{1,64}$", help="the caller's name for the run"
            ),
            "timeout": ArgSpec(
                "number", nullable=True, help="seconds; then the app is cancelled (default: none)"
            ),
        },
        help="run a card app and return its result",
    ),
    "exec": OpSpec(
        "required",
        {
            "argv": ArgSpec("array", help="command and arguments (strings); or 'line'"),
            "line": ArgSpec("string", help="a shell command line; or 'argv'"),
            "timeout": ArgSpec(
                "number", nullable=True, help="seconds the command may run (default 30)"
            ),
            "max_output": ArgSpec("number", default=MAX_OUTPUT, help="bytes kept per stream"),
            "stdin": ArgSpec("string", help="the command's stdin, base64"),
        },
        help="run a shell command on the card through its agent",
    ),
    "console_resize": OpSpec(
        "required",
        {
            "cols": ArgSpec("number", required=True),
            "rows": ArgSpec("number", required=True),
            "device": ArgSpec("string", help="console device (default: the first)"),
        },
        help="set a console's window size (RESIZE to the card)",
    ),
    "net": OpSpec(
        "required",
        {
            "device": ArgSpec("string", help="net device (host name or eth0; default: all)"),
            "link": ArgSpec("string", choices=("up", "down"), help="set the link status first"),
        },
        help="net devices: backend, interfaces, addresses, namespace, counters",
    ),
    "suspend": OpSpec("none", help="host PM suspend: stop every card"),
    "resume": OpSpec("none", help="host PM resume: boot the cards suspend stopped"),
    "events": OpSpec(
        "optional",
        {
            "kinds": ArgSpec("array", default=[], help="event names or categories; [] = all"),
            "buffer": ArgSpec("number", default=DEFAULT_FEED, help="events held for a slow reader"),
        },
        help="stream events (lifecycle, devices, links, apps, errors) of one card or all",
        stream=True,
    ),
    "logs": OpSpec(
        "required",
        {
            "source": ArgSpec("string", default="all", choices=("all", "console", "host")),
            "lines": ArgSpec("number", default=50, help="recent lines first (per source)"),
            "follow": ArgSpec("boolean", default=False, help="then new lines as they come"),
            "device": ArgSpec("string", help="console device (default: the first)"),
        },
        help="a card's console log and the daemon's log lines about it",
        stream=True,
    ),
    "apps": OpSpec("required", help="the card apps running on a card"),
    "kill": OpSpec(
        "required",
        {
            "app_id": ArgSpec("number", help="the app id (micctl apps)"),
            "tag": ArgSpec("string", help="or the tag its run was started with"),
        },
        help="cancel a card app",
    ),
    "devices": OpSpec(
        "required", help="the card's virtio devices: bound driver, state, error, claim holder"
    ),
    "vhost_user_export": OpSpec(
        "none",
        {
            "socket": ArgSpec("string", required=True, help="absolute path of the socket"),
            "switch": ArgSpec("string", required=True, help="one of the daemon's switches"),
            "mtu": ArgSpec("number", default=1500, help="the port's MTU"),
        },
        help="serve a vhost-user net socket on a daemon switch (a QEMU guest shares it)",
    ),
    "vhost_user_unexport": OpSpec(
        "none",
        {"socket": ArgSpec("string", required=True, help="the exported socket")},
        help="stop serving an exported vhost-user socket",
    ),
    "vhost_user_exports": OpSpec("none", help="the vhost-user sockets the daemon serves"),
}


# ------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Request:
    """A validated request; ``args`` has every argument of the op, defaults filled in."""

    id: int
    op: str
    card: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def handler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the :class:`ControlHandler` method named ``op``."""
        kw = dict(self.args)
        if OPS[self.op].card != "none":
            kw["card"] = self.card
        return kw


@dataclass(frozen=True, slots=True)
class Response:
    """A decoded response: ``result`` if ``ok``, else ``error`` (the daemon's error)."""

    id: int | None
    ok: bool
    result: dict[str, Any] | None = None
    error: WireError | None = None

    def unwrap(self) -> dict[str, Any]:
        """The result, or the error re-raised as its ``virtio.errors`` class
        (:meth:`WireError.exception`; a ``RemoteProtocolError`` gets reason ``daemon``)."""
        if self.ok:
            assert self.result is not None
            return self.result
        assert self.error is not None
        raise self.error.exception(reason="daemon")


class BadRequest(RemoteProtocolError):
    """A request line that does not follow the protocol; ``id`` if one could be read."""

    def __init__(self, message: str, *, id: int | None = None) -> None:  # noqa: A002
        super().__init__(message, reason="bad-request")
        self.id = id


# ----------------------------------------------------------------- encoding


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _dumps(obj: Mapping[str, Any]) -> bytes:
    """One line. Raises ValueError/TypeError for non-JSON values, ValueError if too long."""
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    if len(data) + 1 > MAX_MESSAGE:
        raise ValueError(f"message of {len(data) + 1} bytes exceeds the {MAX_MESSAGE}-byte bound")
    return data + b"\n"


def _loads(line: bytes, what: str) -> dict[str, Any]:
    if len(line) > MAX_MESSAGE:
        raise RemoteProtocolError(
            f"{what} of {len(line)} bytes exceeds the {MAX_MESSAGE}-byte bound", reason="too-long"
        )
    try:
        obj = json.loads(
            line.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_duplicates
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RemoteProtocolError(f"{what} is not valid JSON: {e}", reason="bad-json") from e
    if not isinstance(obj, dict):
        raise RemoteProtocolError(
            f"{what} must be a JSON object, got {type(obj).__name__}", reason="bad-json"
        )
    return obj


def _is_id(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_ID


def _check_arg(op: str, name: str, spec: ArgSpec, value: object) -> str | None:
    """A problem with ``value``, or None."""
    if value is None:
        return None if spec.nullable else "must not be null"
    kind = spec.kind
    ok = {
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }[kind]
    if not ok:
        return f"must be a {kind}, got {type(value).__name__}"
    if kind == "number" and not (0 <= value < float("inf")):  # type: ignore[operator]
        return f"must be a non-negative finite number, got {value!r}"
    if spec.choices is not None and value not in spec.choices:
        return f"must be one of {', '.join(spec.choices)}, got {value!r}"
    if spec.pattern is not None and not re.match(spec.pattern, str(value)):
        return f"bad value {value!r}"
    return None


def _validate(obj: Mapping[str, Any], exc: Callable[[str], MicError]) -> Request:
    rid = obj.get("id")
    op = obj.get("op")
    if not isinstance(op, str):
        raise exc("'op' must be a string naming an operation")
    spec = OPS.get(op)
    if spec is None:
        raise exc(f"unknown op {op!r} (ops: {', '.join(OPS)})")
    card = obj.get("card")
    if spec.card == "none" and card is not None:
        raise exc(f"op {op!r} takes no card")
    if spec.card == "required" and card is None:
        raise exc(f"op {op!r} needs a card")
    if card is not None and not isinstance(card, str):
        raise exc(f"'card' must be a string, got {type(card).__name__}")
    args: dict[str, Any] = {}
    for name, value in obj.items():
        if name in ("id", "op", "card"):
            continue
        aspec = spec.args.get(name)
        if aspec is None:
            known = ", ".join(spec.args) or "none"
            raise exc(f"unknown argument {name!r} for op {op!r} (arguments: {known})")
        problem = _check_arg(op, name, aspec, value)
        if problem:
            raise exc(f"{op}: argument {name!r} {problem}")
        args[name] = value
    for name, aspec in spec.args.items():
        if name not in args:
            if aspec.required:
                raise exc(f"{op}: missing required argument {name!r}")
            default = aspec.default
            args[name] = (
                dict(default)
                if isinstance(default, dict)
                else list(default)
                if isinstance(default, list)
                else default
            )
    if not _is_id(rid):
        raise exc(f"'id' must be an int in [0, 2**53), got {rid!r}")
    return Request(id=rid, op=op, card=card, args=args)


def encode_request(
    id: int,  # noqa: A002
    op: str,
    card: str | None = None,
    **args: Any,
) -> bytes:
    """One request line. ``None`` arguments are left out (the daemon's default).

    Raises:
        LocalProtocolError: unknown op, bad card, unknown or ill-typed argument,
            non-JSON value, or a message over the bound.
    """
    if not _is_id(id):
        raise LocalProtocolError(f"request id must be an int in [0, 2**53), got {id!r}")
    obj: dict[str, Any] = {"id": id, "op": op}
    if card is not None:
        obj["card"] = card
    obj.update({k: v for k, v in args.items() if v is not None})
    _validate(obj, LocalProtocolError)
    try:
        return _dumps(obj)
    except (TypeError, ValueError) as e:
        raise LocalProtocolError(f"cannot encode {op} request: {e}") from e


def decode_request(line: bytes) -> Request:
    """Parse and validate one request line (from a client).

    Raises:
        BadRequest: anything that is not a valid request; ``.id`` is set when
            the line had a usable id, so the error can be answered.
    """
    try:
        obj = _loads(line, "request")
    except RemoteProtocolError as e:
        raise BadRequest(str(e)) from e
    rid = obj.get("id")
    if not _is_id(rid):
        raise BadRequest(f"'id' must be an int in [0, 2**53), got {rid!r}")

    def exc(message: str) -> MicError:
        return BadRequest(message, id=rid)

    return _validate(obj, exc)


def encode_response(id: int | None, result: Mapping[str, Any]) -> bytes:  # noqa: A002
    """One ``ok: true`` line.

    Raises:
        TypeError, ValueError: ``result`` is not JSON-serialisable or too large.
    """
    return _dumps({"id": id, "ok": True, "result": result})


def encode_error(id: int | None, error: WireError) -> bytes:  # noqa: A002
    """One ``ok: false`` line carrying ``error`` (its message cut if the line would be too long)."""
    try:
        return _dumps({"id": id, "ok": False, "error": error.to_wire()})
    except ValueError:
        cut = WireError(error.type, error.base, error.message[: MAX_MESSAGE // 8] + " [truncated]")
        return _dumps({"id": id, "ok": False, "error": cut.to_wire()})


def decode_response(line: bytes) -> Response:
    """Parse and validate one response line (from the daemon).

    Raises:
        RemoteProtocolError: anything that is not a valid response.
    """
    return _response_from(_loads(line, "response"))


def _response_from(obj: dict[str, Any]) -> Response:
    rid = obj.get("id")
    if rid is not None and not _is_id(rid):
        raise RemoteProtocolError(f"response 'id' must be an int or null, got {rid!r}")
    ok = obj.get("ok")
    if ok is True:
        if set(obj) != {"id", "ok", "result"} or not isinstance(obj["result"], dict):
            raise RemoteProtocolError("ok response needs exactly id, ok and a result object")
        return Response(id=rid, ok=True, result=obj["result"])
    if ok is False:
        if set(obj) != {"id", "ok", "error"}:
            raise RemoteProtocolError("error response needs exactly id, ok and an error object")
        return Response(id=rid, ok=False, error=WireError.from_wire(obj["error"]))
    raise RemoteProtocolError(f"response 'ok' must be true or false, got {ok!r}")


# ------------------------------------------------------------------ streams


@dataclass(frozen=True, slots=True)
class StreamLine:
    """An item (``item``) or the end (``end``) of the stream opened by request ``id``."""

    id: int
    item: dict[str, Any] | None = None
    end: dict[str, Any] | None = None


def encode_item(id: int, item: Mapping[str, Any]) -> bytes:  # noqa: A002
    """One stream item line.

    Raises:
        TypeError, ValueError: ``item`` is not JSON-serialisable or too large.
    """
    return _dumps({"id": id, "item": item})


def encode_end(id: int, result: Mapping[str, Any]) -> bytes:  # noqa: A002
    """The line that ends the stream of request ``id``."""
    return _dumps({"id": id, "end": result})


def decode_line(line: bytes) -> Response | StreamLine:
    """Parse one line from the daemon: a response, or a stream item or end.

    Raises:
        RemoteProtocolError: anything else.
    """
    obj = _loads(line, "response")
    if "ok" in obj:
        return _response_from(obj)
    rid = obj.get("id")
    for key in ("item", "end"):
        if key in obj:
            if set(obj) != {"id", key} or not _is_id(rid) or not isinstance(obj[key], dict):
                raise RemoteProtocolError(f"stream {key} needs exactly an int id and an object")
            return StreamLine(rid, **{key: obj[key]})
    raise RemoteProtocolError("a line from the daemon needs 'ok', 'item' or 'end'")
