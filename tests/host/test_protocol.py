"""The control socket (mic_host.control), the client library and micctl, over real Unix sockets.

The daemon here is a small handler class (and, for ``launch``, a small fake
daemon module run as a real child process); the real daemon's integration
tests live with it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from mic_host import micctl
from mic_host.client import Client, connect, launch
from mic_host.control.server import ControlServer, serve_connection
from mic_host.control.wire import (
    MAX_MESSAGE,
    OPS,
    PROTOCOL_VERSION,
    BadRequest,
    Request,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_response,
)
from mic_host.paths import control_socket_path
from virtio.errors import (
    INTERNAL_ERROR,
    BrokenResourceError,
    ClosedResourceError,
    ConfigError,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    RemoteProtocolError,
    ResourceError,
    WireError,
)

# ------------------------------------------------------------ encode/decode


def test_request_round_trip_fills_defaults() -> None:
    line = encode_request(7, "boot", "mic0", wait=True, timeout=None)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line) == {"id": 7, "op": "boot", "card": "mic0", "wait": True}
    req = decode_request(line)
    assert req == Request(7, "boot", "mic0", {"wait": True, "timeout": None})
    assert req.handler_kwargs() == {"card": "mic0", "wait": True, "timeout": None}
    assert decode_request(encode_request(1, "ping")).handler_kwargs() == {}
    assert decode_request(encode_request(2, "status")).handler_kwargs() == {"card": None}
    att = decode_request(encode_request(3, "attach", "mic0", type="block"))
    assert att.args == {"type": "block", "options": {}}


def test_every_op_has_a_handler_method_in_the_protocol_class() -> None:
    from mic_host.control.server import ControlHandler

    for op in OPS:
        assert callable(getattr(ControlHandler, op))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"id": 1, "op": "fly"}, "unknown op 'fly'"),
        ({"id": 1, "op": "boot"}, "op 'boot' needs a card"),
        ({"id": 1, "op": "ping", "card": "mic0"}, "op 'ping' takes no card"),
        ({"id": 1, "op": "boot", "card": "mic0", "wait": "yes"}, "'wait' must be a boolean"),
        ({"id": 1, "op": "boot", "card": "mic0", "colour": 1}, "unknown argument 'colour'"),
        ({"id": 1, "op": "wait", "card": "mic0"}, "missing required argument 'state'"),
        ({"id": 1, "op": "wait", "card": "mic0", "state": "asleep"}, "must be one of ready"),
        ({"id": 1, "op": "boot", "card": "mic0", "timeout": -1}, "non-negative finite"),
        ({"id": 1, "op": "run", "card": "mic0", "app": "no colon"}, "bad value"),
        ({"id": -1, "op": "ping"}, "request id must be an int"),
        ({"id": True, "op": "ping"}, "request id must be an int"),
    ],
)
def test_encode_request_rejects_misuse(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode_request(**kwargs)


def test_encode_request_rejects_non_json_and_oversized() -> None:
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        encode_request(1, "attach", "mic0", type="block", options={"x": object()})
    with pytest.raises(LocalProtocolError, match="exceeds"):
        encode_request(1, "run", "mic0", app="m:f", args=["x" * MAX_MESSAGE])


@pytest.mark.parametrize(
    ("line", "match", "rid"),
    [
        (b"", "not valid JSON", None),
        (b"hello\n", "not valid JSON", None),
        (b"\xff\xfe\n", "not valid JSON", None),
        (b"[1, 2]\n", "must be a JSON object", None),
        (b'{"id": 1, "id": 2, "op": "ping"}\n', "duplicate key", None),
        (b'{"id": NaN, "op": "ping"}\n', "NaN is not valid JSON", None),
        (b'{"op": "ping"}\n', "'id' must be an int", None),
        (b'{"id": "1", "op": "ping"}\n', "'id' must be an int", None),
        (b'{"id": 9007199254740992, "op": "ping"}\n', "'id' must be an int", None),
        (b'{"id": 4, "op": 5}\n', "'op' must be a string", 4),
        (b'{"id": 4, "op": "ping", "x": 1}\n', "unknown argument 'x'", 4),
        (b'{"id": 5, "op": "status", "card": 0}\n', "'card' must be a string", 5),
        (
            b'{"id": 6, "op": "run", "card": "mic0", "app": "m:f", "args": {}}\n',
            "must be a array",
            6,
        ),
        (b'{"id": 6, "op": "boot", "card": "mic0", "timeout": 1e999}\n', "finite", 6),
        (b'{"id": 6, "op": "boot", "card": "mic0", "wait": null}\n', "must not be null", 6),
        (b"[" * 100_000 + b"\n", "not valid JSON", None),
        (b'{"id": 1, "op": "' + b"x" * MAX_MESSAGE + b'"}\n', "exceeds", None),
    ],
)
def test_decode_request_rejects_garbage(line: bytes, match: str, rid: int | None) -> None:
    with pytest.raises(BadRequest, match=match) as ei:
        decode_request(line)
    assert isinstance(ei.value, RemoteProtocolError)
    assert ei.value.id == rid


def test_response_round_trip() -> None:
    ok = decode_response(encode_response(3, {"state": "online"}))
    assert (ok.id, ok.ok, ok.unwrap()) == (3, True, {"state": "online"})
    wire = WireError.from_exception(LocalProtocolError("cannot boot mic0"))
    err = decode_response(encode_error(4, wire))
    assert (err.id, err.ok, err.error) == (
        4,
        False,
        WireError("LocalProtocolError", "LocalProtocolError", "cannot boot mic0"),
    )
    with pytest.raises(LocalProtocolError, match=r"^cannot boot mic0$"):
        err.unwrap()
    assert decode_response(encode_error(None, WireError("X", "X", "m"))).id is None
    old = decode_response(
        b'{"id": 5, "ok": false, "error": {"type": "ConfigError", "message": "m"}}'
    )
    assert old.error == WireError("ConfigError", "ConfigError", "m")  # base defaults to type
    with pytest.raises(ValueError, match="Out of range float"):
        encode_response(1, {"x": float("nan")})


def test_oversized_error_message_is_truncated() -> None:
    line = encode_error(1, WireError("MicError", "MicError", "m" * MAX_MESSAGE))
    assert len(line) <= MAX_MESSAGE
    assert decode_response(line).error.message.endswith("[truncated]")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "line",
    [
        b"nope\n",
        b"[]\n",
        b'{"id": 1}\n',
        b'{"id": 1, "ok": "yes"}\n',
        b'{"id": "1", "ok": true, "result": {}}\n',
        b'{"id": 1, "ok": true, "result": []}\n',
        b'{"id": 1, "ok": true, "result": {}, "extra": 1}\n',
        b'{"id": 1, "ok": false}\n',
        b'{"id": 1, "ok": false, "error": {"type": 1, "message": "m"}}\n',
        b'{"id": 1, "ok": false, "error": {"type": "T"}}\n',
        b'{"id": 1, "ok": false, "error": {"type": "T", "message": "m", "base": 3}}\n',
        b'{"id": 1, "ok": false, "error": {"type": "T", "message": "m", "extra": 1}}\n',
        b'{"id": 1, "ok": false, "error": "T: m"}\n',
    ],
)
def test_decode_response_rejects_garbage(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_response(line)


class CardGone(BrokenResourceError):
    """A subclass outside virtio.errors, as transport defines them."""


def test_errors_travel_as_wire_errors() -> None:
    """The control socket's errors are virtio.errors.WireError: type, base, message."""

    def round_trip(exc: BaseException) -> MicError:
        line = encode_error(1, WireError.from_exception(exc))
        with pytest.raises(MicError) as ei:
            decode_response(line).unwrap()
        return ei.value

    assert WireError.from_exception(ConfigError("x")).to_wire() == {
        "type": "ConfigError",
        "base": "ConfigError",
        "message": "x",
    }
    assert WireError.from_exception(CardGone("x")).base == "BrokenResourceError"
    assert WireError.from_exception(TimeoutError()).type == "MicTimeoutError"
    assert WireError.from_exception(KeyError("x")).base == INTERNAL_ERROR
    e = round_trip(CardGone("gone"))
    assert type(e) is BrokenResourceError
    assert str(e) == "gone"
    assert type(round_trip(TimeoutError("t"))) is MicTimeoutError
    assert type(round_trip(RuntimeError("bug"))) is MicError
    assert type(round_trip(SystemExit("no"))) is MicError  # only MicError classes
    rpe = round_trip(RemoteProtocolError("bad"))
    assert isinstance(rpe, RemoteProtocolError)
    assert rpe.reason == "daemon"


def test_control_socket_path(tmp_path: Path) -> None:
    assert control_socket_path(tmp_path) == tmp_path / "control.sock"
    with pytest.raises(ConfigError, match="longer than 107 bytes"):
        control_socket_path(tmp_path / ("x" * 120))


# ---------------------------------------------------------- a real server


class FakeDaemon:
    """A ControlHandler with one card, covering the ok and error paths."""

    def __init__(self) -> None:
        self.state = "ready"
        self.calls: list[tuple[str, Any]] = []
        self.online = asyncio.Event()

    def _card(self, card: str) -> None:
        if card != "mic0":
            raise ConfigError(f"no card {card!r} (cards: mic0)")

    async def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": PROTOCOL_VERSION}

    async def status(self, card: str | None) -> dict[str, Any]:
        if card is not None:
            self._card(card)
        return {
            "cards": [
                {
                    "name": "mic0",
                    "state": self.state,
                    "shutdown_status": "nop",
                    "pid": None,
                    "devices": [{"device": "hvc0", "type": "console", "name": None}],
                }
            ]
        }

    async def boot(self, card: str, wait: bool, timeout: float | None) -> dict[str, Any]:
        self._card(card)
        if self.state != "ready":
            raise LocalProtocolError(f"cannot boot mic0: state is {self.state}, boot needs ready")
        self.calls.append(("boot", (wait, timeout)))
        self.state = "online"
        self.online.set()
        return {"card": card, "state": self.state}

    async def shutdown(self, card: str, wait: bool, timeout: float | None) -> dict[str, Any]:
        self.state = "ready"
        return {"card": card, "state": "ready"}

    async def reset(self, card: str) -> dict[str, Any]:
        raise CardGone("mic0: link lost during reset")

    async def wait(self, card: str, state: str, timeout: float | None) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            await self.online.wait()
        return {"card": card, "state": "online"}

    async def attach(self, card: str, type: str, options: dict[str, Any]) -> dict[str, Any]:  # noqa: A002
        self.calls.append(("attach", (type, options)))
        return {"device": "vdb", "type": type}

    async def detach(self, card: str, device: str) -> dict[str, Any]:
        self.calls.append(("detach", device))
        return {}

    async def stats(self, card: str) -> dict[str, Any]:
        raise RuntimeError("stats bug")

    async def run(
        self,
        card: str,
        app: str,
        args: list[Any],
        code: dict[str, Any] | None,
        tag: str | None,
        timeout: float | None,
    ) -> dict[str, Any]:
        assert code is not None  # the client sent the app's code
        assert [m["name"] for m in code["modules"]] == ["m"]
        if app == "m:bad":
            return {"value": object()}
        return {"value": [app, *args]}

    async def suspend(self) -> dict[str, Any]:
        raise TimeoutError

    async def resume(self) -> Any:
        return "not a dict"


@pytest.fixture(autouse=True)
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``m.py`` in the current folder: the card app the client tests run."""
    (tmp_path / "m.py").write_text(
        "async def f(card):\n    pass\n\nasync def bad(card):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short directory (Unix socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="mic-t-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest_asyncio.fixture
async def daemon(state_dir: Path) -> AsyncIterator[FakeDaemon]:
    handler = FakeDaemon()
    async with ControlServer(state_dir, handler):
        yield handler
    assert not (state_dir / "control.sock").exists()


@pytest_asyncio.fixture
async def client(daemon: FakeDaemon, state_dir: Path) -> AsyncIterator[Client]:
    async with connect(state_dir) as c:
        yield c


async def raw_exchange(state_dir: Path, data: bytes, n: int) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(state_dir / "control.sock"))
    try:
        writer.write(data)
        await writer.drain()
        return [json.loads(await reader.readline()) for _ in range(n)]
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_ok_paths(client: Client, daemon: FakeDaemon) -> None:
    assert (await client.ping())["version"] == PROTOCOL_VERSION
    card = client.card("mic0")
    assert (await card.status())["state"] == "ready"
    assert await card.state() == "ready"
    assert await card.boot(timeout=5) == {"card": "mic0", "state": "online"}
    assert daemon.calls[-1] == ("boot", (True, 5))
    assert await card.attach("block", image="/x.img", size=4096) == {
        "device": "vdb",
        "type": "block",
    }
    assert daemon.calls[-1] == ("attach", ("block", {"image": "/x.img", "size": 4096}))
    assert await card.detach("vdb") == {}
    assert await card.run("m:f", 1, "two") == {"value": ["m:f", 1, "two"]}
    assert await card.wait("online", timeout=1) == {"card": "mic0", "state": "online"}
    assert (await card.shutdown())["state"] == "ready"


@pytest.mark.asyncio
async def test_error_paths_raise_the_named_class(client: Client) -> None:
    card = client.card("mic0")
    await card.boot()
    with pytest.raises(
        LocalProtocolError, match=r"^cannot boot mic0: state is online, boot needs ready$"
    ):
        await card.boot()
    with pytest.raises(ConfigError, match="no card 'mic9'"):
        await client.card("mic9").boot()
    with pytest.raises(BrokenResourceError, match="link lost during reset"):
        await card.reset()
    with pytest.raises(MicTimeoutError):
        await client.suspend()


@pytest.mark.asyncio
async def test_internal_errors_do_not_kill_the_server(client: Client) -> None:
    card = client.card("mic0")
    with pytest.raises(MicError, match="internal error in stats: RuntimeError: stats bug") as ei:
        await card.stats()
    assert type(ei.value) is MicError
    with pytest.raises(MicError, match="internal error in run"):
        await card.run("m:bad")
    with pytest.raises(MicError, match="internal error in resume: result is not an object"):
        await client.resume()
    assert (await client.ping())["version"] == PROTOCOL_VERSION  # same connection still served


@pytest.mark.asyncio
async def test_error_responses_on_the_wire(daemon: FakeDaemon, state_dir: Path) -> None:
    data = b'{"id": 1, "op": "stats", "card": "mic0"}\n{"id": 2, "op": "reset", "card": "mic0"}\n'
    errors = {r["id"]: r["error"] for r in await raw_exchange(state_dir, data, 2)}
    assert errors[1] == {
        "type": "RuntimeError",
        "base": INTERNAL_ERROR,
        "message": "internal error in stats: RuntimeError: stats bug (see the daemon log)",
    }
    assert errors[2] == {
        "type": "CardGone",
        "base": "BrokenResourceError",
        "message": "mic0: link lost during reset",
    }


@pytest.mark.asyncio
async def test_requests_on_one_connection_run_concurrently(client: Client) -> None:
    card = client.card("mic0")
    waiter = asyncio.create_task(card.wait("online", timeout=5))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert (await card.status())["state"] == "ready"  # not held up by the wait
    await card.boot()
    assert (await waiter)["state"] == "online"


@pytest.mark.asyncio
async def test_wait_timeout_is_a_mic_timeout(client: Client) -> None:
    with pytest.raises(MicTimeoutError):
        await client.card("mic0").wait("online", timeout=0.05)


@pytest.mark.asyncio
async def test_garbage_lines_get_errors_and_the_connection_survives(
    daemon: FakeDaemon, state_dir: Path
) -> None:
    data = (
        b"this is not json\n"
        b"\n"  # blank lines are skipped
        b'{"id": 3, "op": "boot", "card": "mic0", "wait": "no"}\n'
        b'{"id": 4, "op": "fly"}\n'
        b'{"id": 5, "op": "ping"}\r\n'
    )
    out = await raw_exchange(state_dir, data, 4)
    by_id = {r["id"]: r for r in out}
    assert by_id[None]["ok"] is False
    assert by_id[None]["error"]["type"] == "LocalProtocolError"
    assert by_id[None]["error"]["message"].startswith("bad request: request is not valid JSON")
    assert "'wait' must be a boolean" in by_id[3]["error"]["message"]
    assert "unknown op 'fly'" in by_id[4]["error"]["message"]
    assert by_id[5] == {"id": 5, "ok": True, "result": {"pid": os.getpid(), "version": 1}}


@pytest.mark.asyncio
async def test_half_close_still_gets_answers(daemon: FakeDaemon, state_dir: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(state_dir / "control.sock"))
    writer.write(b'{"id": 1, "op": "ping"}\n{"id": 2, "op": "status"}')  # last line unterminated
    writer.write_eof()
    lines = [json.loads(line) for line in (await reader.read()).splitlines()]
    writer.close()
    await writer.wait_closed()
    assert {(r["id"], r["ok"]) for r in lines} == {(1, True), (None, False)}


@pytest.mark.asyncio
async def test_oversized_line_ends_the_connection_only(daemon: FakeDaemon, state_dir: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(state_dir / "control.sock"))
    writer.write(b"x" * (MAX_MESSAGE + 10) + b"\n")
    await writer.drain()
    resp = json.loads(await reader.readline())
    assert resp["ok"] is False
    assert "exceeds" in resp["error"]["message"]
    assert await reader.read() == b""  # closed
    writer.close()
    await writer.wait_closed()
    out = await raw_exchange(state_dir, b'{"id": 1, "op": "ping"}\n', 1)
    assert out[0]["ok"] is True


@pytest.mark.asyncio
async def test_serve_connection_over_a_socketpair() -> None:
    import socket

    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    creader, cwriter = await asyncio.open_connection(sock=b)
    task = asyncio.create_task(serve_connection(reader, writer, FakeDaemon()))
    cwriter.write(encode_request(1, "status", "mic0"))
    await cwriter.drain()
    resp = decode_response(await creader.readline())
    assert resp.unwrap()["cards"][0]["name"] == "mic0"
    cwriter.close()
    await cwriter.wait_closed()
    await asyncio.wait_for(task, 5)


@pytest.mark.asyncio
async def test_daemon_closing_fails_pending_requests(state_dir: Path) -> None:
    handler = FakeDaemon()
    server = ControlServer(state_dir, handler)
    await server.start()
    async with connect(state_dir) as c:
        pending = asyncio.create_task(c.card("mic0").wait("online"))
        await asyncio.sleep(0.05)
        await server.aclose()
        with pytest.raises(BrokenResourceError, match="closed the connection"):
            await pending
        assert c.lost
        with pytest.raises(BrokenResourceError):
            await c.ping()
    with pytest.raises(ClosedResourceError):
        await c.ping()


@pytest.mark.asyncio
async def test_second_server_is_refused_and_stale_socket_replaced(
    daemon: FakeDaemon, state_dir: Path
) -> None:
    with pytest.raises(ResourceError, match="already serves"):
        await ControlServer(state_dir, FakeDaemon()).start()
    other = Path(tempfile.mkdtemp(prefix="mic-t-"))
    try:
        import socket

        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(other / "control.sock"))
        stale.close()  # bound, never listening: a dead daemon's socket
        async with ControlServer(other, FakeDaemon()), connect(other) as c:
            assert (await c.ping())["version"] == 1
        (other / "control.sock").write_text("not a socket")
        with pytest.raises(ConfigError, match="exists and is not a socket"):
            await ControlServer(other, FakeDaemon()).start()
    finally:
        shutil.rmtree(other, ignore_errors=True)


@pytest.mark.asyncio
async def test_a_stopping_server_leaves_a_newer_servers_socket(state_dir: Path) -> None:
    """The state directory removed under a running daemon and a second one started
    there: the first one's exit must not take the second one's socket with it."""
    first = ControlServer(state_dir, FakeDaemon())
    await first.start()
    (state_dir / "control.sock").unlink()  # what `rm -rf STATE_DIR` does to it
    async with ControlServer(state_dir, FakeDaemon()):
        await first.aclose()
        async with connect(state_dir) as c:
            assert (await c.ping())["version"] == 1
    assert not (state_dir / "control.sock").exists()  # the second one removes its own


@pytest.mark.asyncio
async def test_connect_without_daemon(state_dir: Path) -> None:
    with pytest.raises(
        BrokenResourceError, match=rf"^no mic-host daemon at {state_dir} \(control.sock missing\)$"
    ):
        async with connect(state_dir):
            pass


@pytest.mark.asyncio
async def test_client_rejects_bad_requests_locally(client: Client) -> None:
    with pytest.raises(LocalProtocolError, match="unknown op"):
        await client.request("fly")
    with pytest.raises(LocalProtocolError, match="unknown card state 'asleep'"):
        await client.card("mic0").wait("asleep")


# ------------------------------------------------------------------ launch

FAKE_DAEMON = textwrap.dedent(
    """
    import argparse, asyncio, os, signal, sys
    from mic_host.control.server import ControlServer

    class H:
        async def ping(self):
            return {"pid": os.getpid(), "version": 1}
        async def status(self, card):
            return {"cards": [{"name": "mic0", "state": "online"}]}

    async def main():
        p = argparse.ArgumentParser()
        p.add_argument("--state-dir", required=True)
        p.add_argument("--config")
        p.add_argument("--exit-with-parent", action="store_true")  # launch() always passes it
        a = p.parse_args()
        mode = os.environ.get("FAKE_MODE", "ok")
        print("fake: starting", mode, a.config, flush=True)
        if mode == "die":
            print("fake: boom", file=sys.stderr, flush=True)
            sys.exit(3)
        if mode == "hang":
            await asyncio.sleep(3600)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if mode == "ignore-term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with ControlServer(a.state_dir, H()):
            await stop.wait()

    asyncio.run(main())
    """
)


@pytest.fixture
def fake_module(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "fake_micd.py").write_text(FAKE_DAEMON)
    return {"module": "fake_micd", "env": {"PYTHONPATH": str(tmp_path)}}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.asyncio
async def test_launch_starts_serves_and_stops(state_dir: Path, fake_module: dict[str, Any]) -> None:
    toml = '[[cards]]\nname = "mic0"\n'
    async with launch(state_dir, toml, **fake_module) as c:
        pid = (await c.ping())["pid"]
        assert pid != os.getpid()
        assert (await c.card("mic0").status())["state"] == "online"
    assert (state_dir / "launch-config.toml").read_text() == toml
    assert not alive(pid)
    assert not (state_dir / "control.sock").exists()


@pytest.mark.asyncio
async def test_launch_reports_a_daemon_that_dies(
    state_dir: Path, fake_module: dict[str, Any]
) -> None:
    fake_module["env"]["FAKE_MODE"] = "die"
    with pytest.raises(BrokenResourceError, match="exited with status 3 during startup") as ei:
        async with launch(state_dir, **fake_module):
            pass
    assert "fake: boom" in str(ei.value)


@pytest.mark.asyncio
async def test_launch_startup_is_bounded(state_dir: Path, fake_module: dict[str, Any]) -> None:
    fake_module["env"]["FAKE_MODE"] = "hang"
    # 2 s, not less: the fake daemon is a fresh Python process, and on a loaded
    # 2-CPU machine it may not have printed its first line within 0.5 s
    with pytest.raises(MicTimeoutError, match=r"did not answer ping within 2s ") as ei:
        async with launch(state_dir, startup_timeout=2.0, **fake_module):
            pass
    assert "fake: starting hang" in str(ei.value)


@pytest.mark.asyncio
async def test_launch_kills_a_daemon_that_ignores_sigterm(
    state_dir: Path, fake_module: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    fake_module["env"]["FAKE_MODE"] = "ignore-term"
    async with launch(state_dir, stop_timeout=0.3, **fake_module) as c:
        pid = (await c.ping())["pid"]
    assert not alive(pid)
    assert "ignored SIGTERM" in caplog.text


@pytest.mark.asyncio
async def test_launch_reports_a_daemon_that_dies_in_use(
    state_dir: Path, fake_module: dict[str, Any]
) -> None:
    async def use_then_kill() -> None:
        async with launch(state_dir, **fake_module) as c:
            os.kill((await c.ping())["pid"], signal.SIGKILL)
            with pytest.raises(BrokenResourceError):
                await c.ping()

    with pytest.raises(BrokenResourceError, match="exited with status -9 while in use"):
        await use_then_kill()


@pytest.mark.asyncio
async def test_launch_checks_config_text_first(state_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"launch\(config=...\): cards\[0\]\.name: bad card name"):
        async with launch(state_dir, '[[cards]]\nname = "x"\n', python="/nonexistent"):
            pass
    with pytest.raises(ConfigError, match=r"pass pathlib\.Path for a file"):
        async with launch(state_dir, "my.toml", python="/nonexistent"):
            pass


# ------------------------------------------------------------------ micctl


def test_micctl_status_table() -> None:
    result = {
        "cards": [
            {
                "name": "mic0",
                "state": "online",
                "shutdown_status": "nop",
                "pid": 4242,
                "devices": [
                    {"device": "hvc0", "type": "console", "name": None},
                    {"device": "vda", "type": "block", "name": "disk"},
                ],
            },
            {
                "name": "mic1",
                "state": "ready",
                "shutdown_status": "halted",
                "pid": None,
                "devices": [],
            },
        ]
    }
    assert micctl.format_status(result) == (
        "CARD  STATE   SHUTDOWN  PID   DEVICES\n"
        "mic0  online  nop       4242  hvc0:console, vda:block(disk)\n"
        "mic1  ready   halted    -     -"
    )
    assert micctl.format_status({"cards": [], "suspended": True}).endswith("'micctl resume')")


def test_micctl_stats_table() -> None:
    result = {
        "card": "mic0",
        "devices": [
            {
                "device": "vda",
                "type": "block",
                "doorbells": 12,
                "queues": [
                    {"index": i, "wakeups": 4 + i, "chains": 15, "buffers": 15}
                    | {"interrupts": 9, "bytes": 4096, "errors": 0}
                    for i in range(2)
                ],
                "backend": {"io_errors": 1, "unsupported": 0},
            },
            {"device": "hvc0", "type": "console", "queues": [], "backend": {}},
            {
                "device": "eth0",
                "type": "net",
                "doorbells": 1,
                "queues": [],
                "backend": {"drops": {"rx": {"full": 2}}},
            },
        ],
    }
    assert micctl.format_stats(result) == (
        "DEVICE        DOORBELLS  QUEUE  WAKEUPS  CHAINS  BUFFERS  INTERRUPTS  BYTES  ERRORS\n"
        "vda:block     12         0      4        15      15       9           4096   0\n"
        "                         1      5        15      15       9           4096   0\n"
        "hvc0:console  -          -      -        -       -        -           -      -\n"
        "eth0:net      1          -      -        -       -        -           -      -\n"
        "backend counters:\n"
        "  vda:block: io_errors 1  unsupported 0\n"
        "  eth0:net: drops.rx.full 2"
    )


def test_micctl_attach_arguments() -> None:
    args = micctl.build_parser().parse_args(
        [
            "attach",
            "mic0",
            "block",
            "--image",
            "/d.img",
            "--size",
            "64M",
            "--create",
            "--read-only",
            "--serial",
            "SN",
            "--opt",
            "x=1",
            "--opt",
            "y=true",
            "--opt",
            "z=a=b",
        ]
    )
    assert (args.card, args.type) == ("mic0", "block")
    assert micctl.attach_options(args) == {
        "image": "/d.img",
        "size": 64 << 20,
        "create": True,
        "read_only": True,
        "serial": "SN",
        "x": 1,
        "y": True,
        "z": "a=b",
    }
    dup = micctl.build_parser().parse_args(
        ["attach", "mic0", "block", "--size", "1M", "--opt", "size=2M"]
    )
    with pytest.raises(micctl.UsageError, match="'size' given both"):
        micctl.attach_options(dup)


def test_micctl_parses_every_subcommand() -> None:
    p = micctl.build_parser()
    a = p.parse_args(["--state-dir", "/s", "boot", "mic0", "--wait", "--timeout", "2.5"])
    assert (a.state_dir, a.cards, a.wait, a.timeout) == ("/s", ["mic0"], True, 2.5)
    a = p.parse_args(["boot", "mic0", "mic1", "--all"])
    assert (a.cards, a.all) == (["mic0", "mic1"], True)  # validate() refuses the mix
    a = p.parse_args(["run", "mic0", "pkg.mod:fn", "a", "--flag", "3"])
    assert (a.app, a.args) == ("pkg.mod:fn", ["a", "--flag", "3"])
    a = p.parse_args(["wait", "mic1", "online"])
    assert (a.cards, a.state, a.timeout) == (["mic1"], "online", None)
    a = p.parse_args(["wait", "mic1", "mic2", "ready"])
    assert (a.cards, a.state) == (["mic1", "mic2"], "ready")
    a = p.parse_args(["wait", "--all", "ready"])
    assert (a.cards, a.all, a.state) == ([], True, "ready")
    assert p.parse_args(["status"]).cards == []
    assert p.parse_args(["status", "mic0", "--json"]).json is True
    for cmd in (
        ["suspend"],
        ["resume"],
        ["reset", "mic0"],
        ["detach", "mic0", "vdb"],
        ["stats", "mic0"],
    ):
        assert p.parse_args(cmd).command == cmd[0]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        ([], "required: COMMAND"),
        (["fly"], "invalid choice: 'fly'"),
        (["boot"], "boot needs a card"),
        (["boot", "mic0", "--all"], "names or --all, not both"),
        (["boot", "gpu0"], "bad card name 'gpu0'"),
        (["boot", "mic0", "--timeout", "0"], "positive number of seconds"),
        (["wait", "mic0", "asleep"], "invalid choice: 'asleep'"),
        (["attach", "mic0", "block", "--size", "12X"], "bad size '12X'"),
        (["attach", "mic0", "block", "--opt", "novalue"], "expected key=value"),
        (["run", "mic0", "nocolon"], "expected module:function"),
        (["attach", "mic0", "block", "--opt", "a=1", "--opt", "a=2"], "option 'a' given twice"),
    ],
)
def test_micctl_usage_errors_are_one_line_exit_2(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    assert micctl.main(["--state-dir", str(state_dir), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("micctl: ")
    assert match in err


def test_micctl_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert micctl.main(["--help"]) == 0
    assert "attach" in capsys.readouterr().out


def test_micctl_without_daemon(capsys: pytest.CaptureFixture[str], state_dir: Path) -> None:
    assert micctl.main(["--state-dir", str(state_dir), "status"]) == 1
    assert (
        capsys.readouterr().err
        == f"micctl: no mic-host daemon at {state_dir} (control.sock missing)\n"
    )


def test_micctl_state_dir_from_environment(
    capsys: pytest.CaptureFixture[str], state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIC_STATE_DIR", str(state_dir / "env"))
    assert micctl.main(["ping"]) == 1
    assert f"no mic-host daemon at {state_dir / 'env'} " in capsys.readouterr().err


async def run_micctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(micctl.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.asyncio
async def test_micctl_against_a_server(
    daemon: FakeDaemon, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sd = ["--state-dir", str(state_dir)]
    code, out, _ = await run_micctl(capsys, *sd, "status")
    assert code == 0
    assert out.splitlines()[1].split()[:2] == ["mic0", "ready"]
    code, out, _ = await run_micctl(capsys, *sd, "status", "mic0", "--json")
    assert code == 0
    assert json.loads(out)["cards"][0]["state"] == "ready"
    assert await run_micctl(capsys, *sd, "boot", "mic0", "--wait") == (0, "mic0: online\n", "")
    assert await run_micctl(capsys, *sd, "boot", "mic0") == (
        1,
        "",
        "micctl: cannot boot mic0: state is online, boot needs ready\n",
    )
    assert await run_micctl(
        capsys, *sd, "attach", "mic0", "block", "--image", "/a", "--size", "1M"
    ) == (0, "vdb\n", "")
    assert daemon.calls[-1] == ("attach", ("block", {"image": "/a", "size": 1 << 20}))
    assert await run_micctl(capsys, *sd, "detach", "mic0", "vdb") == (0, "", "")
    code, out, _ = await run_micctl(capsys, *sd, "run", "mic0", "m:f", "x")
    assert code == 0
    assert json.loads(out) == ["m:f", "x"]
    code, _, err = await run_micctl(capsys, *sd, "stats", "mic0")
    assert code == 1
    assert err.startswith("micctl: internal error in stats")
    assert err.count("\n") == 1
    assert await run_micctl(capsys, *sd, "ping") == (
        0,
        f"mic-host pid {os.getpid()}, protocol 1\n",
        "",
    )
    code, _, err = await run_micctl(capsys, *sd, "suspend")
    assert code == 1
    assert err.startswith("micctl: MicTimeoutError")


def test_micctl_subcommand_registry() -> None:
    assert {"status", "boot", "attach", "run", "suspend"} <= set(micctl.SUBCOMMANDS)

    async def hello(client: Client, args: Any) -> int:
        return 0

    sub = micctl.Subcommand("hello", "say hi", lambda p: None, hello)
    micctl.register_subcommand(sub)
    try:
        assert micctl.build_parser().parse_args(["hello"]).command == "hello"
        with pytest.raises(ValueError, match="already registered"):
            micctl.register_subcommand(sub)
    finally:
        del micctl.SUBCOMMANDS["hello"]


def test_python_m_micctl_runs(state_dir: Path) -> None:
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "mic_host.micctl", "--state-dir", str(state_dir), "status"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1
    assert r.stderr.startswith("micctl: no mic-host daemon")


# -- what a client can hold in the server (issue 14, item 8) ---------------------------


def test_lines_split_bound_and_charge_the_budget() -> None:
    from mic_host.control.server import InputBudget, LineBuffer

    budget = InputBudget(100)
    lines = LineBuffer(budget)
    assert lines.feed(b'{"a"') == ([], None)
    assert budget.used == 4
    assert lines.feed(b':1}\n{"b":2}\n{') == ([b'{"a":1}\n', b'{"b":2}\n'], None)
    assert budget.used == 1
    assert lines.pending == b"{"
    # over the daemon-wide budget: the connection must end, its bytes are given back
    got, fatal = lines.feed(b"x" * 100)
    assert got == []
    assert fatal is not None
    assert "unfinished" in fatal
    assert budget.used == 0
    assert lines.pending == b""
    # another connection's share is its own
    other = LineBuffer(budget)
    assert other.feed(b"y" * 99) == ([], None)
    assert budget.used == 99
    other.release()
    assert budget.used == 0


def test_lines_over_max_message_end_the_connection() -> None:
    from mic_host.control.server import InputBudget, LineBuffer

    budget = InputBudget(4 * MAX_MESSAGE)
    lines = LineBuffer(budget)
    # an unfinished line at the bound
    got, fatal = lines.feed(b"x" * MAX_MESSAGE)
    assert (got, budget.used) == ([], 0)
    assert fatal is not None
    assert "exceeds" in fatal
    # a complete line over the bound, after a good one: the good one is served
    lines = LineBuffer(budget)
    got, fatal = lines.feed(b"ok\n" + b"x" * MAX_MESSAGE + b"\n")
    assert got == [b"ok\n"]
    assert fatal is not None
    assert "exceeds" in fatal
    assert budget.used == 0


@pytest.mark.asyncio
async def test_hangup_cancels_waiting_requests_but_half_close_is_answered() -> None:
    import socket

    from mic_host.control.server import HangupWatch

    handler = FakeDaemon()
    watch = HangupWatch()
    try:
        # a client that closes entirely: its wait (no timeout) is cancelled at once
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=a)
        task = asyncio.create_task(serve_connection(reader, writer, handler, hangups=watch))
        b.sendall(encode_request(1, "wait", "mic0", state="online"))
        await asyncio.sleep(0.05)
        assert not task.done()
        b.close()
        await asyncio.wait_for(task, 2)
        # a client that only shuts down its sending side still gets its answer
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=a)
        task = asyncio.create_task(serve_connection(reader, writer, handler, hangups=watch))
        b.sendall(encode_request(2, "wait", "mic0", state="online", timeout=5))
        b.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.05)
        assert not task.done()
        handler.online.set()
        await asyncio.wait_for(task, 2)
        b.setblocking(True)
        assert decode_response(b.recv(4096)).unwrap()["state"] == "online"
        b.close()
    finally:
        watch.close()


@pytest.mark.asyncio
async def test_control_socket_is_owner_only_and_state_dir_tightened(state_dir: Path) -> None:
    import stat

    os.chmod(state_dir, 0o755)
    old = os.umask(0)
    try:
        async with ControlServer(state_dir, FakeDaemon()) as server:
            assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    finally:
        os.umask(old)
