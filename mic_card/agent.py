"""The card agent: answers JSON requests from the host on the console port ``org.mic-vop.agent.0``.

The card-side twin of :mod:`mic_host.agent` (QEMU's ``qemu-ga`` plays this
role in a guest). Newline-delimited JSON, one object per line, UTF-8, at most
:data:`MAX_LINE` bytes; ``docs/console.md`` is the reference.

Requests ``{"id": N, "op": OP, ...}``:

- ``ping`` -> ``{"pong": true, "uptime": s}``
- ``info`` -> card name, system, version, commands, devices, limits
- ``exec`` with ``argv`` (list of strings) or ``line`` (a shell command line),
  optional ``timeout`` (s, default 30), ``max_output`` (bytes per stream),
  ``stdin`` (base64) -> ``{"status", "stdout", "stderr" (base64),
  "truncated", "timed_out", "elapsed"}``. The command runs through the
  shell's registry (:mod:`mic_card.shell`), non-interactively. A command
  still running at ``timeout`` is cancelled: status 124, as ``timeout(1)``.

Answers ``{"id": N, "ok": true, "result": {...}}`` or ``{"id": N|null, "ok":
false, "error": {"type", "base", "message"}}`` (the project's one error wire
form, :class:`virtio.errors.WireError`; a bad request is ``type``
``BadRequest``, ``base`` ``RemoteProtocolError``). A line that is not a valid request is
answered with an error (``id`` null if none could be read), logged, and the
agent carries on; requests run concurrently (at most :data:`MAX_CONCURRENT`).

Depends on :class:`mic_card.services.CardServices` and the shell's registry,
never on the card OS. Must not import ``transport`` or ``mic_host``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from typing import TYPE_CHECKING, Any

from mic_card.services import CardServices
from mic_card.shell import (
    COMMANDS,
    MACHINE,
    STATUS_TIMEOUT,
    SYSNAME,
    VERSION,
    CaptureOutput,
    CardFS,
    ShellContext,
    run_argv,
    run_line,
)
from virtio.agent import (
    AGENT_PORT,
    DEFAULT_TIMEOUT,
    MAX_LINE,
    MAX_OUTPUT,
    LineSplitter,
    decode,
    encode,
    exec_problem,
)
from virtio.errors import BrokenResourceError, RemoteProtocolError, WireError

if TYPE_CHECKING:
    from mic_card.drivers.console import ConsolePort

__all__ = ["AGENT_PORT", "MAX_CONCURRENT", "MAX_LINE", "MAX_OUTPUT", "Agent", "BadRequest"]

log = logging.getLogger(__name__)

MAX_CONCURRENT = 8


class BadRequest(RemoteProtocolError):
    """A request line that does not follow the protocol (answered, never fatal).

    The host's fault, so a :class:`RemoteProtocolError`; it travels back as
    ``{"type": "BadRequest", "base": "RemoteProtocolError", "message"}``.
    """

    def __init__(self, message: str, rid: int | None = None) -> None:
        super().__init__(message, reason="bad-request")
        self.rid = rid


def _error_reply(e: BadRequest) -> dict[str, Any]:
    return {"id": e.rid, "ok": False, "error": WireError.from_exception(e).to_wire()}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Agent:
    """The agent on one console port; :meth:`run` serves until the port goes away."""

    def __init__(
        self, card: CardServices | None, port: ConsolePort, fs: CardFS | None = None
    ) -> None:
        self.card = card
        self.port = port
        self.fs = fs or CardFS(card)
        self.requests = 0
        self.bad_requests = 0
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self._write_lock = asyncio.Lock()

    async def run(self) -> None:
        self.port.open()
        log.info("agent listening on %s", self.port.label)
        lines = LineSplitter()
        try:
            async with asyncio.TaskGroup() as tg:
                async for chunk in self.port:
                    complete, overflowed = lines.feed(chunk)
                    for line in complete:
                        await self._slots.acquire()
                        tg.create_task(self._serve(line))
                    if overflowed:
                        self.bad_requests += 1
                        log.warning("agent: request line over %d bytes discarded", MAX_LINE)
                        bad = BadRequest(f"line over {MAX_LINE} bytes")
                        await self._send(_error_reply(bad))
        except* BrokenResourceError:
            pass
        log.info("agent on %s stopped", self.port.label)

    async def _send(self, msg: dict[str, Any]) -> None:
        data = encode(msg)
        async with self._write_lock:
            await self.port.write(data)

    async def _serve(self, line: bytes) -> None:
        try:
            self.requests += 1
            shutdown: str | None = None
            try:
                req = self._parse(line)
                result, shutdown = await self._handle(req)
                reply: dict[str, Any] = {"id": req["id"], "ok": True, "result": result}
            except BadRequest as e:
                self.bad_requests += 1
                log.warning("agent: rejected request: %s (%.80r)", e, line)
                reply = _error_reply(e)
            await self._send(reply)
            if shutdown is not None and self.card is not None:
                self.card.shutdown(shutdown)
        finally:
            self._slots.release()

    @staticmethod
    def _parse(line: bytes) -> dict[str, Any]:
        try:
            req = decode(line)
        except RemoteProtocolError as e:
            raise BadRequest(f"a request must be a JSON object ({e})") from None
        rid = req.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 2**53:
            raise BadRequest(f"'id' must be an int in [0, 2**53), got {rid!r:.40}")
        if not isinstance(req.get("op"), str):
            raise BadRequest("'op' must be a string", rid)
        return req

    async def _handle(self, req: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        op, rid = req["op"], req["id"]
        uptime = self.card.uptime if self.card is not None else 0.0
        if op == "ping":
            return {"pong": True, "uptime": round(uptime, 3)}, None
        if op == "info":
            card = self.card
            return {
                "card": card.name if card is not None else None,
                "system": SYSNAME,
                "version": VERSION,
                "machine": MACHINE,
                "uptime": round(uptime, 3),
                "commands": sorted(COMMANDS),
                "devices": [d["name"] for d in card.devices()] if card is not None else [],
                "max_output": MAX_OUTPUT,
                "max_line": MAX_LINE,
            }, None
        if op == "exec":
            return await self._exec(req)
        raise BadRequest(f"unknown op {op!r:.40} (ops: ping, info, exec)", rid)

    async def _exec(self, req: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        rid = req["id"]
        argv, line = req.get("argv"), req.get("line")
        timeout, limit = req.get("timeout", DEFAULT_TIMEOUT), req.get("max_output", MAX_OUTPUT)
        problem = exec_problem(argv, line, timeout, limit)
        if problem is not None:
            raise BadRequest(problem, rid)
        limit = int(limit)
        stdin = b""
        if req.get("stdin") is not None:
            try:
                stdin = base64.b64decode(str(req["stdin"]), validate=True)
            except (binascii.Error, ValueError) as e:
                raise BadRequest(f"'stdin' is not base64: {e}", rid) from None
        out, err = CaptureOutput(limit), CaptureOutput(limit)
        ctx = ShellContext(self.card, self.fs, out, err, stdin=stdin, interactive=False)
        what = " ".join(argv) if argv is not None else line
        t0 = time.monotonic()
        timed_out = False
        try:
            async with asyncio.timeout(timeout):
                if argv is not None:
                    status = await run_argv(ctx, argv)
                else:
                    status = await run_line(ctx, str(line))
        except TimeoutError:
            timed_out = True
            status = STATUS_TIMEOUT
            await err.write(f"{what}: timed out after {timeout:g} s\n".encode())
        elapsed = time.monotonic() - t0
        log.info("agent: exec %.200s -> %d (%.3f s)", what, status, elapsed)
        return {
            "status": status,
            "stdout": _b64(bytes(out.data)),
            "stderr": _b64(bytes(err.data)),
            "truncated": out.truncated or err.truncated,
            "timed_out": timed_out,
            "elapsed": round(elapsed, 6),
        }, ctx.shutdown
