"""The control-socket protocol between the mic-host daemon and its clients.

Owns the wire format (newline-delimited JSON over ``STATE_DIR/control.sock``),
the table of operations and their arguments (:data:`OPS`), the mapping of
errors to and from the wire, the :class:`ControlHandler` seam the daemon
implements, and the server side (:func:`serve_connection`,
:class:`ControlServer`). The full description for users is ``docs/cli.md``.
Imports asyncio and ``virtio.errors``; never ``transport`` or the card.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, TypeGuard

from mic_host.lifecycle import CardState
from virtio import errors as _errors
from virtio.agent import MAX_OUTPUT
from virtio.errors import (
    ConfigError,
    LocalProtocolError,
    MicError,
    RemoteProtocolError,
    ResourceError,
)

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_MESSAGE",
    "SOCKET_NAME",
    "INTERNAL_ERROR",
    "OPS",
    "ArgSpec",
    "OpSpec",
    "Request",
    "Response",
    "BadRequest",
    "ControlHandler",
    "ControlServer",
    "control_socket_path",
    "encode_request",
    "decode_request",
    "encode_response",
    "encode_error",
    "decode_response",
    "error_to_wire",
    "error_from_wire",
    "serve_connection",
]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
#: Bound on one line, newline included, both directions.
MAX_MESSAGE = 1 << 20
SOCKET_NAME = "control.sock"
#: Error type for a handler failure that is not a MicError (a daemon bug).
INTERNAL_ERROR = "InternalError"
#: Requests served at once per connection; reading pauses beyond (back-pressure).
MAX_IN_FLIGHT = 64
#: sockaddr_un.sun_path is 108 bytes including the NUL (unix(7)).
_SUN_PATH_MAX = 107
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
}


class ControlHandler(Protocol):
    """What the daemon implements; :func:`serve_connection` calls these by op name.

    (``timeout`` is a wire argument the daemon applies with ``asyncio.timeout``,
    hence the ASYNC109 exemptions.)

    Every method returns a JSON-serialisable dict (the response's ``result``)
    and raises a :class:`~virtio.errors.MicError` subclass for a refused or
    failed operation (sent as ``ok: false`` with the class name).
    ``timeout=None`` means the card's configured bound.
    """

    async def ping(self) -> dict[str, Any]: ...
    async def status(self, card: str | None) -> dict[str, Any]: ...
    async def boot(self, card: str, wait: bool, timeout: float | None) -> dict[str, Any]: ...
    async def shutdown(self, card: str, wait: bool, timeout: float | None) -> dict[str, Any]: ...
    async def reset(self, card: str) -> dict[str, Any]: ...
    async def wait(self, card: str, state: str, timeout: float | None) -> dict[str, Any]: ...
    async def attach(self, card: str, type: str, options: dict[str, Any]) -> dict[str, Any]: ...  # noqa: A002
    async def detach(self, card: str, device: str) -> dict[str, Any]: ...
    async def stats(self, card: str) -> dict[str, Any]: ...
    async def run(self, card: str, app: str, args: list[Any]) -> dict[str, Any]: ...
    async def exec(
        self,
        card: str,
        argv: list[Any] | None,
        line: str | None,
        timeout: float | None,
        max_output: float,
        stdin: str | None,
    ) -> dict[str, Any]: ...
    async def console_resize(
        self, card: str, cols: float, rows: float, device: str | None
    ) -> dict[str, Any]: ...
    async def net(self, card: str, device: str | None, link: str | None) -> dict[str, Any]: ...
    async def suspend(self) -> dict[str, Any]: ...
    async def resume(self) -> dict[str, Any]: ...


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
    """A decoded response: ``result`` if ``ok``, else ``error_type``/``error_message``."""

    id: int | None
    ok: bool
    result: dict[str, Any] | None = None
    error_type: str | None = None
    error_message: str | None = None
    error_base: str | None = None

    def unwrap(self) -> dict[str, Any]:
        """The result, or the error re-raised as its ``virtio.errors`` class."""
        if self.ok:
            assert self.result is not None
            return self.result
        etype = self.error_type or "MicError"
        raise error_from_wire(etype, self.error_message or "", self.error_base)


class BadRequest(RemoteProtocolError):
    """A request line that does not follow the protocol; ``id`` if one could be read."""

    def __init__(self, message: str, *, id: int | None = None) -> None:  # noqa: A002
        super().__init__(message, reason="bad-request")
        self.id = id


# ----------------------------------------------------------------- encoding


def control_socket_path(state_dir: str | os.PathLike[str]) -> Path:
    """``STATE_DIR/control.sock``.

    Raises:
        ConfigError: the path is too long for a Unix socket (108 bytes).
    """
    path = Path(state_dir).expanduser().absolute() / SOCKET_NAME
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ConfigError(
            f"{path}: control socket path is longer than {_SUN_PATH_MAX} bytes "
            "(a Unix socket limit); choose a shorter state directory"
        )
    return path


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


def encode_error(id: int | None, type: str, message: str, base: str | None = None) -> bytes:  # noqa: A002
    """One ``ok: false`` line (``base`` defaults to ``type``)."""
    err = {"type": type, "base": base or type, "message": message}
    try:
        return _dumps({"id": id, "ok": False, "error": err})
    except ValueError:
        err["message"] = message[: MAX_MESSAGE // 8] + " [truncated]"
        return _dumps({"id": id, "ok": False, "error": err})


def decode_response(line: bytes) -> Response:
    """Parse and validate one response line (from the daemon).

    Raises:
        RemoteProtocolError: anything that is not a valid response.
    """
    obj = _loads(line, "response")
    rid = obj.get("id")
    if rid is not None and not _is_id(rid):
        raise RemoteProtocolError(f"response 'id' must be an int or null, got {rid!r}")
    ok = obj.get("ok")
    if ok is True:
        if set(obj) != {"id", "ok", "result"} or not isinstance(obj["result"], dict):
            raise RemoteProtocolError("ok response needs exactly id, ok and a result object")
        return Response(id=rid, ok=True, result=obj["result"])
    if ok is False:
        err = obj.get("error")
        if set(obj) != {"id", "ok", "error"} or not isinstance(err, dict):
            raise RemoteProtocolError("error response needs exactly id, ok and an error object")
        etype, msg, base = err.get("type"), err.get("message"), err.get("base")
        if not isinstance(etype, str) or not isinstance(msg, str):
            raise RemoteProtocolError("error object needs string 'type' and 'message'")
        if base is not None and not isinstance(base, str):
            raise RemoteProtocolError("error 'base' must be a string")
        return Response(id=rid, ok=False, error_type=etype, error_message=msg, error_base=base)
    raise RemoteProtocolError(f"response 'ok' must be true or false, got {ok!r}")


# ------------------------------------------------------------------- errors

_WIRE_CLASSES: dict[str, type[MicError]] = {
    name: cls
    for name in _errors.__all__
    if isinstance(cls := getattr(_errors, name), type) and issubclass(cls, MicError)
}


def error_to_wire(exc: BaseException) -> tuple[str, str]:
    """``(type, base)`` for an exception: its class name and nearest ``virtio.errors`` class.

    A builtin :class:`TimeoutError` (``asyncio.timeout`` in a handler) is
    reported as ``MicTimeoutError``; anything else not a MicError is
    :data:`INTERNAL_ERROR`.
    """
    if isinstance(exc, MicError):
        base = next(
            (c.__name__ for c in type(exc).__mro__ if _WIRE_CLASSES.get(c.__name__) is c),
            "MicError",
        )
        return type(exc).__name__, base
    if isinstance(exc, TimeoutError):
        return "MicTimeoutError", "MicTimeoutError"
    return INTERNAL_ERROR, INTERNAL_ERROR


def error_from_wire(type: str, message: str, base: str | None = None) -> MicError:  # noqa: A002
    """The exception to raise for an error response: the ``virtio.errors`` class named
    ``type``, else the one named ``base``, else :class:`MicError`."""
    cls = _WIRE_CLASSES.get(type) or _WIRE_CLASSES.get(base or "") or MicError
    if cls is _errors.RemoteProtocolError:
        return _errors.RemoteProtocolError(message, reason="daemon")
    return cls(message)


# ------------------------------------------------------------------- server


async def _call(handler: object, req: Request) -> bytes:
    method = getattr(handler, req.op, None)
    if method is None:
        return encode_error(
            req.id, "LocalProtocolError", f"op {req.op!r} is not supported by this daemon"
        )
    try:
        result = await method(**req.handler_kwargs())
    except asyncio.CancelledError:
        raise
    except Exception as e:
        etype, base = error_to_wire(e)
        if etype == INTERNAL_ERROR:
            log.exception("control: %s failed", req.op)
            msg = f"internal error in {req.op}: {type(e).__name__}: {e} (see the daemon log)"
        else:
            log.info("control: %s %s refused: %s: %s", req.op, req.card or "", etype, e)
            msg = str(e) or etype
        return encode_error(req.id, etype, msg, base)
    if not isinstance(result, dict):
        log.error("control: %s returned %r, not a dict", req.op, type(result).__name__)
        return encode_error(
            req.id, INTERNAL_ERROR, f"internal error in {req.op}: result is not an object"
        )
    try:
        return encode_response(req.id, result)
    except (TypeError, ValueError) as e:
        log.error("control: %s result cannot be sent: %s", req.op, e)
        return encode_error(req.id, INTERNAL_ERROR, f"internal error in {req.op}: {e}")


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: ControlHandler | object,
    *,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> None:
    """Serve one client until it closes its side and its requests are answered.

    Each request runs as a child task (so one connection can ``wait`` and ask
    ``status`` at once). Handler errors become error responses; nothing a
    client sends or a handler raises ends the server except the connection's
    own failure. The writer is closed on return. Cancellation cancels the
    in-flight requests.
    """
    lock = asyncio.Lock()
    slots = asyncio.Semaphore(max_in_flight)
    peer_gone = False

    async def send(data: bytes) -> None:
        nonlocal peer_gone
        if peer_gone:
            return
        try:
            async with lock:
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError) as e:
            peer_gone = True
            log.debug("control: client went away: %s", e)

    async def handle(line: bytes) -> None:
        try:
            try:
                req = decode_request(line)
            except BadRequest as e:
                await send(encode_error(e.id, "LocalProtocolError", f"bad request: {e}"))
                return
            await send(await _call(handler, req))
        finally:
            slots.release()

    try:
        async with asyncio.TaskGroup() as tg:
            while not peer_gone:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as e:
                    if e.partial.strip():
                        msg = "bad request: line not terminated by a newline"
                        await send(encode_error(None, "LocalProtocolError", msg))
                    break
                except asyncio.LimitOverrunError:
                    await send(
                        encode_error(
                            None,
                            "LocalProtocolError",
                            f"bad request: line exceeds the {MAX_MESSAGE}-byte bound; closing",
                        )
                    )
                    break
                except (ConnectionError, OSError):
                    break
                if not line.strip():
                    continue
                await slots.acquire()
                tg.create_task(handle(line))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


class ControlServer:
    """The daemon's listening socket: ``async with ControlServer(state_dir, handler):``.

    On start it creates ``state_dir`` (mode 0700), refuses to run if another
    daemon answers on ``control.sock``, removes a stale socket file, listens,
    and makes the socket 0600. On close it stops listening, cancels the
    connections' requests, waits for them and removes the socket file.
    """

    def __init__(self, state_dir: str | os.PathLike[str], handler: ControlHandler | object) -> None:
        self.state_dir = Path(state_dir).expanduser().absolute()
        self.path = control_socket_path(self.state_dir)
        self.handler = handler
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen.

        Raises:
            ResourceError: another daemon serves this state directory.
            ConfigError: the socket path exists and is not a socket, or the
                directory cannot be created.
        """
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{self.state_dir}: cannot create state directory: {e}") from e
        await self._clear_stale()
        self._server = await asyncio.start_unix_server(
            self._accept, path=str(self.path), limit=MAX_MESSAGE + 1
        )
        os.chmod(self.path, 0o600)

    async def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{self.path}: exists and is not a socket; remove it")
        try:
            _r, w = await asyncio.open_unix_connection(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            self.path.unlink(missing_ok=True)  # a dead daemon's socket
            return
        w.close()
        with contextlib.suppress(ConnectionError, OSError):
            await w.wait_closed()
        raise ResourceError(f"a mic-host daemon already serves {self.state_dir}")

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(
            serve_connection(reader, writer, self.handler), name="control-connection"
        )
        self._conns.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._conns.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("control: connection failed", exc_info=exc)

    async def aclose(self) -> None:
        """Stop listening, cancel and reap the connections, remove the socket file."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        conns = list(self._conns)
        for t in conns:
            t.cancel()
        if conns:
            await asyncio.gather(*conns, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
