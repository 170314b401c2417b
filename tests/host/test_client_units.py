"""The client library's sans-IO pieces, and what it must never import.

Exec results and console lookup (``mic_host.client.console``), the error
answers of the accelerator offload channel (``mic_host.client.accel``) and of
the card agent (``mic_host.agent``): all parsed as ``virtio.errors.WireError``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from typing import Any

import pytest

from mic_host.agent import AgentClient
from mic_host.client.accel import _error_from
from mic_host.client.console import ExecResult, find_console
from virtio.errors import (
    BrokenResourceError,
    LocalProtocolError,
    MicError,
    RemoteProtocolError,
    ResourceError,
    WireError,
)

# ------------------------------------------------------------- exec, console


def test_exec_result_from_the_daemons_answer() -> None:
    r = ExecResult.from_result(
        {
            "status": 3,
            "stdout": base64.b64encode(b"out").decode(),
            "stderr": base64.b64encode(b"err").decode(),
            "truncated": True,
            "elapsed": 0.5,
        }
    )
    out, err, status = r
    assert (out, err, status, r.truncated, r.timed_out, r.elapsed) == (
        b"out",
        b"err",
        3,
        True,
        False,
        0.5,
    )
    assert r.text == "out"
    assert ExecResult.from_result({}) == ExecResult(1, b"", b"")
    with pytest.raises(BrokenResourceError, match="bad stdout"):
        ExecResult.from_result({"status": 0, "stdout": "not base64!"})


def test_find_console_in_a_status() -> None:
    status = {
        "devices": [
            {"device": "vda", "type": "block"},
            {"device": "hvc0", "type": "console", "name": None, "pty": None},  # no pty yet
            {"device": "hvc1", "type": "console", "name": "serial", "pty": "/dev/pts/7"},
            {"device": "hvc2", "type": "console", "name": None, "pty": "/dev/pts/8"},
        ]
    }
    assert find_console(status, "mic0") == "/dev/pts/7"
    assert find_console(status, "mic0", "hvc2") == "/dev/pts/8"
    assert find_console(status, "mic0", "serial") == "/dev/pts/7"
    with pytest.raises(LocalProtocolError, match=r"^mic0 has no console 'hvc9'$"):
        find_console(status, "mic0", "hvc9")
    with pytest.raises(LocalProtocolError, match=r"^mic1 has no console$"):
        find_console({}, "mic1")


# ------------------------------------------------------ offload channel errors


def test_offload_error_answers_are_wire_errors() -> None:
    def error(obj: object) -> MicError:
        return _error_from({"type": "error", "error": obj})

    busy = error(WireError("QueueBusy", "ResourceError", "all queues busy").to_wire())
    assert type(busy) is ResourceError
    assert str(busy) == "card: QueueBusy: all queues busy"
    spec = error({"type": "LocalProtocolError", "base": "LocalProtocolError", "message": "no"})
    assert type(spec) is LocalProtocolError
    bug = error({"type": "ZeroDivisionError", "base": "InternalError", "message": "x"})
    assert type(bug) is MicError
    for bad in (None, "busy", {"type": 1, "message": "m"}, {"type": "T", "base": "T"}, {"a": 1}):
        e = error(bad)
        assert type(e) is RemoteProtocolError, bad
        assert "malformed error answer" in str(e)
    assert type(_error_from({"type": "error"})) is RemoteProtocolError


# ------------------------------------------------------------- agent errors


class LoopbackPort:
    """An agent port whose card answers every request with ``answer`` (the request's id)."""

    guest_open = True

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.client: AgentClient | None = None

    async def wait_open(self) -> None:
        return None

    async def write(self, data: bytes) -> None:
        rid = json.loads(data)["id"]
        assert self.client is not None
        line = json.dumps({"id": rid, **self.answer}).encode() + b"\n"
        asyncio.get_running_loop().call_soon(self.client.feed, line)


async def agent_answering(answer: dict[str, Any]) -> dict[str, Any]:
    port = LoopbackPort(answer)
    port.client = AgentClient(port, "mic0")
    return await port.client.request("ping", 1.0)


@pytest.mark.asyncio
async def test_agent_errors_are_wire_errors() -> None:
    assert await agent_answering({"ok": True, "result": {"pong": 1}}) == {"pong": 1}
    new = {"type": "BadRequest", "base": "RemoteProtocolError", "message": "unknown op"}
    with pytest.raises(RemoteProtocolError, match="agent refused ping: BadRequest: unknown op"):
        await agent_answering({"ok": False, "error": new})
    old = {"type": "BadRequest", "message": "unknown op"}  # the card agent's older form
    with pytest.raises(RemoteProtocolError, match="agent refused ping: BadRequest: unknown op"):
        await agent_answering({"ok": False, "error": old})
    with pytest.raises(RemoteProtocolError, match="malformed error"):
        await agent_answering({"ok": False, "error": {"type": "BadRequest", "extra": 1}})
    with pytest.raises(RemoteProtocolError, match="malformed error"):
        await agent_answering({"ok": False, "error": "nope"})


# ------------------------------------------------------------------ layering


def test_the_client_library_never_loads_the_daemon_side() -> None:
    """Importing every client module (and micctl) loads no daemon module."""
    code = (
        "import sys, mic_host, mic_host.client, mic_host.client.accel, "
        "mic_host.client.pytest_plugin, mic_host.micctl\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('mic_host'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "mic_host.client.accel" in out
    daemon_side = {
        "mic_host.card",
        "mic_host.vop",
        "mic_host.backends",
        "mic_host.endpoint",
        "mic_host.agent",
        "mic_host.daemon",
        "mic_host.control.server",
    }
    loaded = {m for m in out if m in daemon_side or m.startswith(("mic_host.backends.",))}
    assert not loaded
    assert not [m for m in out if m.startswith("mic_card")]
