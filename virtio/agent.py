"""The card agent's wire format, shared by the card (server) and the host (client).

Newline-delimited JSON over the console port :data:`AGENT_PORT`, one object
per line, UTF-8, at most :data:`MAX_LINE` bytes (``docs/console.md`` is the
reference). This module owns the limits, the line framing (:class:`LineSplitter`),
encoding and decoding, and the check of an ``exec`` request's arguments, so the
two ends (``mic_card/agent.py``, ``mic_host/agent.py``) and the daemon's control
op cannot drift apart.

Must not import asyncio, ``transport`` or ``mic_*``.
"""

from __future__ import annotations

import json
from typing import Any

from virtio.errors import RemoteProtocolError

__all__ = [
    "AGENT_PORT",
    "DEFAULT_TIMEOUT",
    "MAX_LINE",
    "MAX_OUTPUT",
    "MAX_STDIN",
    "MAX_TIMEOUT",
    "LineSplitter",
    "decode",
    "encode",
    "exec_problem",
]

#: The named console port the agent listens on (QEMU's is ``org.qemu.guest_agent.0``).
AGENT_PORT = "org.mic-vop.agent.0"
#: Bound on one protocol line, newline included, both directions.
MAX_LINE = 1 << 20
#: Bound on stdout and on stderr of one exec (base64 of both fits in a control-socket line).
MAX_OUTPUT = 256 * 1024
#: Bound on the stdin of one exec: it travels whole, base64 in one control-socket line
#: and one agent line (each at most 1 MiB), with room for the rest of the request.
MAX_STDIN = 512 * 1024
#: An exec's timeout when the request gives none, and the largest one allowed (seconds).
DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 24 * 3600.0


def encode(msg: dict[str, Any]) -> bytes:
    """One protocol line (compact JSON and the newline)."""
    return (json.dumps(msg, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line (without its newline) into a JSON object.

    Raises:
        RemoteProtocolError: not UTF-8 JSON, or not an object.
    """
    try:
        msg = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RemoteProtocolError(f"not JSON: {e}", reason="agent") from None
    if not isinstance(msg, dict):
        raise RemoteProtocolError("not a JSON object", reason="agent")
    return msg


class LineSplitter:
    """Bytes in, complete non-blank lines out, with the :data:`MAX_LINE` bound.

    A line that grows past the bound is discarded up to its newline;
    :attr:`overflows` counts them and :meth:`feed` reports each one once.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.overflows = 0
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        """``(lines, overflowed)``: the lines ``data`` completed, and whether a
        line went over the bound in this call (it is being discarded)."""
        buf = self._buf
        buf += data
        lines: list[bytes] = []
        while (i := buf.find(b"\n")) >= 0:
            line = bytes(buf[:i])
            del buf[: i + 1]
            if self._discarding:
                self._discarding = False
            elif line.strip():
                lines.append(line)
        overflowed = len(buf) > self.max_line
        if overflowed:
            buf.clear()
            self._discarding = True
            self.overflows += 1
        return lines, overflowed


def exec_problem(argv: object, line: object, timeout: object, max_output: object) -> str | None:
    """What is wrong with an ``exec`` request's arguments, or None.

    ``argv`` (a non-empty list of strings) or ``line`` (a string): exactly one;
    ``timeout`` a number in (0, :data:`MAX_TIMEOUT`]; ``max_output`` an int in
    [0, :data:`MAX_OUTPUT`]. ``None`` for ``timeout``/``max_output`` means the default.
    """
    if (argv is None) == (line is None):
        return "exec needs exactly one of 'argv' and 'line'"
    if argv is not None and (
        not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv)
    ):
        return "'argv' must be a non-empty array of strings"
    if line is not None and not isinstance(line, str):
        return "'line' must be a string"
    if timeout is not None and (
        not isinstance(timeout, int | float)
        or isinstance(timeout, bool)
        or not 0 < timeout <= MAX_TIMEOUT
    ):
        return f"'timeout' must be a number in (0, {MAX_TIMEOUT:g}]"
    if max_output is not None and (
        not isinstance(max_output, int | float)
        or isinstance(max_output, bool)
        or max_output != int(max_output)
        or not 0 <= max_output <= MAX_OUTPUT
    ):
        return f"'max_output' must be an int in [0, {MAX_OUTPUT}]"
    return None
