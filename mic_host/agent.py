"""The host end of the card agent: JSON requests over the console port ``org.mic-vop.agent.0``.

Like QEMU's guest agent (``qemu-ga`` on a named virtio-serial port), the card
runs an agent (:mod:`mic_card.agent`) on a named port of its virtio console;
this module sends it requests and matches the answers. The protocol is
newline-delimited JSON, one object per line, UTF-8, at most :data:`MAX_LINE`
bytes (``docs/console.md`` is the reference)::

    -> {"id": 1, "op": "exec", "argv": ["sha256sum", "/dev/vda"], "timeout": 30}
    <- {"id": 1, "ok": true, "result": {"status": 0, "stdout": "<base64>",
        "stderr": "", "truncated": false, "timed_out": false, "elapsed": 0.2}}
    <- {"id": null, "ok": false, "error": {"type": "BadRequest",
        "base": "RemoteProtocolError", "message": "..."}}

Errors travel as :class:`virtio.errors.WireError` objects (the older
``{"type", "message"}`` form is read as well); a refusal raises
:class:`~virtio.errors.RemoteProtocolError` naming the agent's error type.

Everything the card sends is untrusted: a line that is not a well-formed
response is logged and dropped, a response to no pending request is dropped.
A request the card does not answer in time fails with
:class:`~virtio.errors.MicTimeoutError`; a card that goes away fails the
pending requests with :class:`~virtio.errors.BrokenResourceError`.

Must not import ``transport`` or ``mic_card``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Protocol

from virtio.agent import (
    DEFAULT_TIMEOUT,
    MAX_LINE,
    MAX_OUTPUT,
    LineSplitter,
    decode,
    encode,
    exec_problem,
)
from virtio.errors import (
    BrokenResourceError,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    RemoteProtocolError,
    WireError,
)

__all__ = [
    "AGENT_GRACE",
    "DEFAULT_EXEC_TIMEOUT",
    "MAX_EXEC_OUTPUT",
    "MAX_LINE",
    "AgentClient",
    "AgentPort",
]

log = logging.getLogger(__name__)

#: The agent's limits (one definition, in :mod:`virtio.agent`), under the host's names.
MAX_EXEC_OUTPUT = MAX_OUTPUT
DEFAULT_EXEC_TIMEOUT = DEFAULT_TIMEOUT
#: How much longer than the command's own timeout the host waits for the answer.
AGENT_GRACE = 5.0
_LOGGED = 20


class AgentPort(Protocol):
    """The console port the agent talks on (:class:`mic_host.backends.console.HostPort`)."""

    guest_open: bool

    async def write(self, data: bytes) -> None: ...

    async def wait_open(self) -> None: ...


class AgentClient:
    """Requests to the card agent over one port; feed it the port's output with :meth:`feed`."""

    def __init__(self, port: AgentPort, label: str) -> None:
        self.port = port
        self.label = label
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._lines = LineSplitter()
        self._closed: MicError | None = None
        self.bad_lines = 0

    # -- card -> host ---------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Bytes the card wrote on the agent port."""
        lines, overflowed = self._lines.feed(data)
        for line in lines:
            self._on_line(line)
        if overflowed:
            self._bad(f"line over {MAX_LINE} bytes; discarding to the next newline")

    def _bad(self, why: str) -> None:
        self.bad_lines += 1
        if self.bad_lines <= _LOGGED:
            log.warning("%s: agent: rejected a line from the card: %s", self.label, why)

    def _on_line(self, line: bytes) -> None:
        try:
            msg = decode(line)
        except RemoteProtocolError as e:
            self._bad(f"{e}: {line[:80]!r}")
            return
        if not isinstance(msg.get("ok"), bool):
            self._bad(f"not a response object: {line[:80]!r}")
            return
        rid = msg.get("id")
        if rid is None:
            err = msg.get("error")
            self._bad(f"the agent refused a request: {err!r:.200}")
            return
        fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if fut is None:
            self._bad(f"answer to no pending request (id {rid!r:.40})")
            return
        if not fut.done():
            fut.set_result(msg)

    def close(self, exc: MicError) -> None:
        """The card went away: fail every pending request with ``exc``."""
        self._closed = exc
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    # -- host -> card ----------------------------------------------------------------
    async def request(self, op: str, bound: float, /, **args: Any) -> dict[str, Any]:
        """Send one request ``{"id", "op", **args}``; wait at most ``bound`` s for the
        port to open and the answer.

        Raises:
            MicTimeoutError: no answer in time (or the agent never opened its port).
            RemoteProtocolError: the agent answered with an error (its type and message).
            BrokenResourceError: the card went away.
        """
        if self._closed is not None:
            raise BrokenResourceError(str(self._closed))
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        what = "open its port"
        try:
            async with asyncio.timeout(bound):
                await self.port.wait_open()
                what = f"answer {op} (id {rid})"
                data = encode({"id": rid, "op": op, **args})
                if len(data) > MAX_LINE:
                    raise LocalProtocolError(f"agent request of {len(data)} B over {MAX_LINE} B")
                await self.port.write(data)
                msg = await fut
        except TimeoutError:
            raise MicTimeoutError(
                f"{self.label}: the card agent did not {what} within {bound:g} s"
            ) from None
        finally:
            self._pending.pop(rid, None)
        if msg["ok"]:
            result = msg.get("result")
            if not isinstance(result, dict):
                raise RemoteProtocolError(
                    f"{self.label}: agent answer to {op} has no result object", reason="agent"
                )
            return result
        try:
            err = WireError.from_wire(msg.get("error"))
        except RemoteProtocolError as e:
            raise RemoteProtocolError(
                f"{self.label}: agent refused {op} with a malformed error: {e}", reason="agent"
            ) from None
        raise RemoteProtocolError(
            f"{self.label}: agent refused {op}: {err.type}: {err.message}", reason="agent"
        )

    async def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        return await self.request("ping", timeout)

    async def info(self, timeout: float = 5.0) -> dict[str, Any]:
        return await self.request("info", timeout)

    async def exec(
        self,
        argv: list[str] | None = None,
        *,
        line: str | None = None,
        timeout: float = DEFAULT_EXEC_TIMEOUT,
        max_output: int = MAX_EXEC_OUTPUT,
        stdin: str | None = None,
    ) -> dict[str, Any]:
        """Run a shell command on the card: ``argv`` or a command ``line``.

        Returns the agent's result: ``status``, ``stdout``/``stderr`` (base64),
        ``truncated``, ``timed_out``, ``elapsed``. The card stops the command
        after ``timeout`` s (status 124); the host waits :data:`AGENT_GRACE` s more.

        Raises:
            LocalProtocolError: neither or both of ``argv`` and ``line``.
            MicTimeoutError, RemoteProtocolError, BrokenResourceError: as :meth:`request`.
        """
        max_output = min(max_output, MAX_EXEC_OUTPUT)
        problem = exec_problem(None if argv is None else list(argv), line, timeout, max_output)
        if problem is not None:
            raise LocalProtocolError(f"exec: {problem}")
        args: dict[str, Any] = {"timeout": timeout, "max_output": max_output}
        if argv is not None:
            args["argv"] = list(argv)
        else:
            args["line"] = line
        if stdin is not None:
            args["stdin"] = stdin
        return await self.request("exec", timeout + AGENT_GRACE, **args)
