"""The host <-> card OS control-link messages: frozen dataclasses with one decoder each way.

Lifecycle traffic only (as COSM messages over SCIF did); data never travels
here. Every message is a small frozen dataclass; :func:`encode` gives the
JSON object for :meth:`transport.link.MessageLink.send` and
:func:`decode_from_card` / :func:`decode_from_host` map the ``type`` tag back
to its class. Both sides ``match`` on the classes, never on strings
(the pattern of h11's ``_events.py`` and aioquic's ``quic/events.py``).

| direction | ``type`` | class | fields |
|---|---|---|---|
| card->host | ``online`` | :class:`Online` | ``devices`` |
| card->host | ``heartbeat`` | :class:`Heartbeat` | ``uptime`` |
| card->host | ``devices`` | :class:`DevicesReply` | ``id``, ``devices`` |
| card->host | ``run_result`` | :class:`RunResult` | ``id``, ``app``, ``ok``, result/error/tb |
| card->host | ``net-params`` | :class:`NetParamsReply` | ``id`` |
| card->host | ``shutdown_status`` | :class:`ShutdownStatusReport` | ``status`` |
| card->host | ``crashed`` | :class:`Crashed` | ``error`` |
| card->host | ``devices_changed`` | :class:`DevicesChanged` | ``devices`` |
| host->card | ``shutdown`` | :class:`Shutdown` | ``status`` (optional) |
| host->card | ``devices`` | :class:`DevicesRequest` | ``id`` |
| host->card | ``run`` | :class:`Run` | ``id``, ``app``, ``args``, ``code``, ``tag`` |
| host->card | ``net-params`` | :class:`NetParams` | ``id``, ``net`` |
| card->host | ``apps`` | :class:`AppsReply` | ``id``, ``apps`` |
| host->card | ``apps`` | :class:`AppsRequest` | ``id`` |
| host->card | ``kill-app`` | :class:`KillApp` | ``id``, ``app`` or ``tag`` |

A request (``devices``, ``run``, ``net-params``, ``apps``, ``kill-app`` from
the host) is answered by exactly one reply class (:func:`reply_type`):
:class:`DevicesReply`, :class:`RunResult`, :class:`NetParamsReply`,
:class:`AppsReply` (for both ``apps`` and ``kill-app``), carrying the request's
``id``. A ``run``'s ``code`` is an app's sources in the form of
:class:`transport.appcode.AppCode` (the card parses it).
A reply of another class, or to an ``id`` the host never sent, is the card's
fault and answers nothing.

Errors travel in the project's one wire form (:class:`virtio.errors.WireError`).
A ``run_result`` carries ``result`` or ``error``, and ``traceback`` (tb), the
card-side traceback of an app that raised.
A decoder raises :class:`RemoteProtocolError` for an unknown ``type``, a
missing, unknown or mistyped field, or fields that contradict each other (a
failed ``run_result`` without an error). A ``shutdown`` to a status the card
does not know still decodes: the card halts. Duplicate keys are refused by the
link's JSON decoder before a message gets here. Imports only ``virtio.errors``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from virtio.errors import LocalProtocolError, RemoteProtocolError, WireError

__all__ = [
    "SHUTDOWN_STATUSES",
    "CardMessage",
    "HostMessage",
    "Reply",
    "Request",
    "Online",
    "Heartbeat",
    "DevicesReply",
    "RunResult",
    "NetParamsReply",
    "ShutdownStatusReport",
    "Crashed",
    "DevicesChanged",
    "Shutdown",
    "DevicesRequest",
    "Run",
    "NetParams",
    "AppsReply",
    "AppsRequest",
    "KillApp",
    "encode",
    "reply_type",
    "decode_from_card",
    "decode_from_host",
]

#: what a card OS may end with (COSM's shutdown status, less ``nop``/``crashed``)
SHUTDOWN_STATUSES = ("halted", "poweroff", "restart")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (_is_int, "an integer"),
    "float": (lambda v: _is_int(v) or isinstance(v, float), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "Any": (lambda v: True, "anything"),
    "list[Any]": (lambda v: isinstance(v, list), "a list"),
    "list[dict[str, Any]]": (
        lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
        "a list of objects",
    ),
    "WireError | None": (lambda v: v is None or isinstance(v, dict), "an error object"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string"),
    "int | None": (lambda v: v is None or _is_int(v), "an integer"),
    "dict[str, Any] | None": (lambda v: v is None or isinstance(v, dict), "an object"),
}


@dataclass(frozen=True, slots=True)
class _Message:
    TYPE: ClassVar[str] = ""

    def problem(self) -> str | None:
        """What is wrong with a decoded message beyond its field types (None: nothing)."""
        return None


# ------------------------------------------------------------- card -> host


@dataclass(frozen=True, slots=True)
class Online(_Message):
    """Boot finished: the devices the card OS probed (its ``devices()`` list)."""

    TYPE: ClassVar[str] = "online"
    devices: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Heartbeat(_Message):
    TYPE: ClassVar[str] = "heartbeat"
    uptime: float


@dataclass(frozen=True, slots=True)
class DevicesReply(_Message):
    TYPE: ClassVar[str] = "devices"
    id: int
    devices: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class RunResult(_Message):
    """An app finished: ``result`` (JSON-able) if ``ok``, else ``error`` (and the
    card-side ``traceback`` of an app that raised)."""

    TYPE: ClassVar[str] = "run_result"
    id: int
    app: str
    ok: bool
    result: Any = None
    error: WireError | None = None
    traceback: str | None = None

    def problem(self) -> str | None:
        if self.ok and self.error is not None:
            return "an ok result carries an error"
        if not self.ok and self.error is None:
            return "a failed result carries no error"
        return None


@dataclass(frozen=True, slots=True)
class NetParamsReply(_Message):
    TYPE: ClassVar[str] = "net-params"
    id: int


@dataclass(frozen=True, slots=True)
class ShutdownStatusReport(_Message):
    """Sent just before a clean exit: ``halted``, ``poweroff`` or ``restart``."""

    TYPE: ClassVar[str] = "shutdown_status"
    status: str


@dataclass(frozen=True, slots=True)
class Crashed(_Message):
    """The card OS failed (best effort, before it exits)."""

    TYPE: ClassVar[str] = "crashed"
    error: str


@dataclass(frozen=True, slots=True)
class DevicesChanged(_Message):
    """The card's device list changed (a driver bound or unbound, a device claimed,
    released or failed, hot add/remove): the whole list, as in :class:`Online`."""

    TYPE: ClassVar[str] = "devices_changed"
    devices: list[dict[str, Any]]


# ------------------------------------------------------------- host -> card


@dataclass(frozen=True, slots=True)
class Shutdown(_Message):
    TYPE: ClassVar[str] = "shutdown"
    status: str = "halted"


@dataclass(frozen=True, slots=True)
class DevicesRequest(_Message):
    TYPE: ClassVar[str] = "devices"
    id: int


@dataclass(frozen=True, slots=True)
class Run(_Message):
    """Run ``module:function`` on the card OS with ``args``.

    ``code``: the app's sources (:class:`transport.appcode.AppCode` wire form),
    loaded fresh for this run; None: import ``module`` from the card's own
    environment. ``tag``: the caller's name for this run, so it can be killed
    (:class:`KillApp`) before the card has told anyone its app id.
    """

    TYPE: ClassVar[str] = "run"
    id: int
    app: str
    args: list[Any] = field(default_factory=list)
    code: dict[str, Any] | None = None
    tag: str | None = None


@dataclass(frozen=True, slots=True)
class NetParams(_Message):
    """A NIC is about to be hot-added: its card-side parameters (``boot_params["net"]``)."""

    TYPE: ClassVar[str] = "net-params"
    id: int
    net: list[dict[str, Any]]


# ------------------------------------------------------------- card apps


@dataclass(frozen=True, slots=True)
class AppsReply(_Message):
    """The card's running apps (``apps``), or the ones a :class:`KillApp` cancelled:
    ``[{"id", "app", "started", "elapsed", "tag"}]`` (``started``: card uptime s)."""

    TYPE: ClassVar[str] = "apps"
    id: int
    apps: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class AppsRequest(_Message):
    TYPE: ClassVar[str] = "apps"
    id: int


@dataclass(frozen=True, slots=True)
class KillApp(_Message):
    """Cancel the running app with id ``app``, or the one started with ``tag``."""

    TYPE: ClassVar[str] = "kill-app"
    id: int
    app: int | None = None
    tag: str | None = None

    def problem(self) -> str | None:
        if (self.app is None) == (self.tag is None):
            return "needs exactly one of app and tag"
        return None


CardMessage = (
    Online
    | Heartbeat
    | DevicesReply
    | RunResult
    | NetParamsReply
    | ShutdownStatusReport
    | Crashed
    | AppsReply
    | DevicesChanged
)
HostMessage = Shutdown | DevicesRequest | Run | NetParams | AppsRequest | KillApp

_FROM_CARD: dict[str, type[_Message]] = {
    c.TYPE: c
    for c in (
        Online,
        Heartbeat,
        DevicesReply,
        RunResult,
        NetParamsReply,
        ShutdownStatusReport,
        Crashed,
        AppsReply,
        DevicesChanged,
    )
}
_FROM_HOST: dict[str, type[_Message]] = {
    c.TYPE: c for c in (Shutdown, DevicesRequest, Run, NetParams, AppsRequest, KillApp)
}


Reply = DevicesReply | RunResult | NetParamsReply | AppsReply
Request = DevicesRequest | Run | NetParams | AppsRequest | KillApp

_REPLIES: dict[type[_Message], type[_Message]] = {
    DevicesRequest: DevicesReply,
    Run: RunResult,
    NetParams: NetParamsReply,
    AppsRequest: AppsReply,
    KillApp: AppsReply,
}


def reply_type(request: Request) -> type[Reply]:
    """The one message class that answers ``request``.

    Raises:
        LocalProtocolError: ``request`` expects no reply.
    """
    cls = _REPLIES.get(type(request))
    if cls is None:
        raise LocalProtocolError(f"{type(request).__name__} expects no reply")
    return cls  # type: ignore[return-value]


def encode(msg: CardMessage | HostMessage) -> dict[str, Any]:
    """The JSON object for ``msg`` (``type`` first).

    Raises:
        LocalProtocolError: ``msg`` is not a link message.
    """
    if not isinstance(msg, _Message) or not msg.TYPE:
        raise LocalProtocolError(f"not a link message: {type(msg).__name__}")
    out: dict[str, Any] = {"type": msg.TYPE}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, WireError):
            value = value.to_wire()
        elif value is None and f.default is None:
            continue  # optional and absent
        out[f.name] = value
    return out


def _decode(obj: dict[str, Any], table: dict[str, type[_Message]], peer: str) -> Any:
    kind = obj.get("type")
    cls = table.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {kind!r:.60} from the {peer}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = set(obj) - set(fields) - {"type"}
    if extra:
        raise RemoteProtocolError(f"{kind} from the {peer} has unknown fields {sorted(extra)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in obj:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                raise RemoteProtocolError(f"{kind} from the {peer} lacks {name!r}")
            continue
        value = obj[name]
        check, what = _CHECKS[str(f.type)]
        if not check(value):
            raise RemoteProtocolError(f"{kind}.{name} from the {peer} must be {what}")
        if str(f.type) == "WireError | None" and value is not None:
            value = WireError.from_wire(value)
        kwargs[name] = value
    msg = cls(**kwargs)
    problem = msg.problem()
    if problem is not None:
        raise RemoteProtocolError(f"{kind} from the {peer}: {problem}")
    return msg


def decode_from_card(obj: dict[str, Any]) -> CardMessage:
    """The message a card OS sent (``obj`` from :meth:`MessageLink.recv`).

    Raises:
        RemoteProtocolError: unknown type, missing/unknown/mistyped field.
    """
    msg: CardMessage = _decode(obj, _FROM_CARD, "card")
    return msg


def decode_from_host(obj: dict[str, Any]) -> HostMessage:
    """The message the host sent (``obj`` from :meth:`MessageLink.recv`).

    Raises:
        RemoteProtocolError: unknown type, missing/unknown/mistyped field.
    """
    msg: HostMessage = _decode(obj, _FROM_HOST, "host")
    return msg
