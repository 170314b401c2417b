"""The daemon against its own clients and its own timers (issue 14, items 3, 4 and 8),
through real processes:

- a shutdown's watchdog never touches a later shutdown, and a card never stays
  ``resetting``;
- the control socket is never connectable by another user, and everything the
  daemon creates in its state directory is 0600 (directories 0700), even with
  umask 0 and an existing 0755 state directory;
- a client that hangs up does not leave work (and fds) behind, and unfinished
  request lines cannot make the daemon's memory grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mic_host
from mic_host.control.server import MAX_CONNECTIONS, MAX_UNFINISHED
from mic_host.control.wire import MAX_MESSAGE
from tests.integration.helpers import booted, card_toml, config, daemon, eventually

HOLD = "tests.integration.hardening_apps:hold_shutdown"


def _sock_path(state_dir: Path) -> str:
    return str(state_dir / "control.sock")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- item 3: the shutdown watchdog -------------------------------------------------------


@pytest.mark.asyncio
async def test_stale_shutdown_watchdog_leaves_a_later_shutdown_alone(state_dir: Path) -> None:
    timeout = 3.0
    async with daemon(state_dir, config(card_toml(shutdown_timeout=timeout))) as client:
        card = await booted(client)
        t0 = time.monotonic()
        st = await card.shutdown(wait=True, timeout=30)  # arms a watchdog due at t0 + 3
        assert st["state"] == "ready"
        await booted(client)
        # The second shutdown starts at t0 + 1.5 and is held up until t0 + 3.4
        # (well within its own 3 s bound): the first one's watchdog, due at
        # t0 + 3, would fire in the middle of it.
        hold = t0 + 3.4 - time.monotonic()
        if hold < 2.0:
            pytest.skip("the machine is too slow to overlap the two shutdowns")
        await card.run(HOLD, hold)
        await asyncio.sleep(max(0.0, t0 + 1.5 - time.monotonic()))
        await card.shutdown(wait=True, timeout=30)
        ended = time.monotonic()
        st = await card.status()
        assert (st["state"], st["shutdown_status"]) == ("ready", "halted"), st
        assert st["last_error"] is None
        assert ended > t0 + timeout + 0.2  # it was still shutting down when the old one was due


@pytest.mark.asyncio
async def test_boot_shutdown_cycles_faster_than_the_shutdown_timeout(state_dir: Path) -> None:
    timeout = 2.0
    async with daemon(state_dir, config(card_toml(shutdown_timeout=timeout))) as client:
        card = client.card("mic0")
        start = time.monotonic()
        cycles = 0
        while time.monotonic() - start < 3.5 * timeout or cycles < 4:
            await card.boot(wait=True, timeout=30)
            await card.shutdown(wait=True, timeout=30)
            cycles += 1
            st = await card.status()
            assert (st["state"], st["shutdown_status"]) == ("ready", "halted"), (cycles, st)
        # every old watchdog has expired by now: nothing moved the card
        await asyncio.sleep(timeout + 0.5)
        st = await card.status()
        assert (st["state"], st["shutdown_status"]) == ("ready", "halted"), st
        assert st["boots"] == cycles
        await booted(client)  # and it still boots


class _HungSession:
    """A boot session whose end never comes (its clean-up hangs)."""

    finished = False
    pid = None
    vop = None
    link = None
    card_devices: list[object] = []  # noqa: RUF012

    def finish(self, *_: object) -> None:
        self.finished = True


@pytest.mark.asyncio
async def test_a_reset_that_cannot_finish_ends_reset_failed(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mic_host.card import manager
    from mic_host.config import CardConfig
    from mic_host.lifecycle import CardState

    monkeypatch.setattr(manager, "RESET_TIMEOUT", 0.2)
    m = manager.CardManager(CardConfig("mic0"), state_dir=state_dir, node_id=1)
    m.lifecycle.state = CardState.ONLINE
    m._session = _HungSession()  # type: ignore[assignment]
    hung = asyncio.get_running_loop().create_future()
    m._session_task = asyncio.ensure_future(hung)
    try:
        st = await m.reset(timeout=5)
        assert st["state"] == "reset_failed"
        assert "reset did not stop the card" in st["last_error"]
        # the session ends after all: the reset completes
        hung.set_result(None)
        m._after_session(manager.CardEvent.RESET, None)
        assert m.state is CardState.READY
    finally:
        hung.cancel()
        await m.aclose()


# -- item 4: permissions ------------------------------------------------------------------


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


async def _first_mode(path: Path, stop: asyncio.Event) -> int | None:
    """The mode of ``path`` the first time it is seen (polled as fast as we can)."""
    while not stop.is_set():
        try:
            return stat.S_IMODE(os.lstat(path).st_mode)
        except FileNotFoundError:
            await asyncio.sleep(0)
    return None


def _modes(root: Path) -> list[tuple[Path, int]]:
    """Every path under ``root`` with its ``st_mode`` (not following links)."""
    return [(p, os.lstat(p).st_mode) for p in root.rglob("*")]


def _connect_as_nobody(path: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except OSError as e:\n"
        "    print('refused', e.errno); sys.exit(0)\n"
        "print('connected'); sys.exit(1)\n"
    )
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    return subprocess.run(
        [*argv, sys.executable, "-I", "-c", code, path],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.asyncio
async def test_state_directory_is_private_even_with_umask_0(state_dir: Path) -> None:
    os.chmod(state_dir, 0o755)
    sock = state_dir / "control.sock"
    stop = asyncio.Event()
    first = asyncio.create_task(_first_mode(sock, stop))
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(stop.set)
        with _umask(0):
            client = await stack.enter_async_context(
                mic_host.launch(state_dir, config(card_toml()))
            )
        # the socket was owner-only from the moment it appeared (then 0600)
        assert await asyncio.wait_for(first, 5) & 0o077 == 0
        await booted(client)
        card = client.card("mic0")
        await card.run("tests.integration.apps:console_write", "hello\n")
        await eventually(
            lambda: (state_dir / "mic0-console.log").exists(), within=5, what="console log"
        )
        assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
        seen = []
        for p, mode in _modes(state_dir):
            seen.append(p.name)
            if stat.S_ISSOCK(mode):  # bind() gives 0777 & ~umask: owner only
                assert stat.S_IMODE(mode) & 0o077 == 0, f"{p.name} is {mode:o}"
                continue
            want = 0o700 if stat.S_ISDIR(mode) else 0o600
            assert stat.S_IMODE(mode) == want, f"{p.name} is {mode:o}, want {want:04o}"
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        # (the card's link is a socket pair now: no mic0.sock; the card OS's
        # offload endpoint is the card-side socket in the directory)
        expected = ("control.sock", "mic0-accel.sock", "mic-host.log", "mic-host.lock", "mic0.img")
        for name in expected:
            assert name in seen
        if shutil.which("setpriv") is not None and os.geteuid() == 0:
            # another user cannot connect, even with the directory opened up
            os.chmod(state_dir, 0o755)
            out = _connect_as_nobody(str(sock))
            assert out.stdout.startswith("refused"), (out.stdout, out.stderr)
            os.chmod(state_dir, 0o700)


# -- item 8: what clients leave behind ------------------------------------------------------


async def _open(state_dir: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(_sock_path(state_dir))


@pytest.mark.asyncio
async def test_requests_of_a_client_that_hung_up_are_cancelled(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        pid = (await client.ping())["pid"]
        baseline = _fds(pid)
        conns = [await _open(state_dir) for _ in range(100)]
        wait = b'{"id": 1, "op": "wait", "card": "mic0", "state": "online", "timeout": 1e9}\n'
        for _r, w in conns:
            w.write(wait)
            await w.drain()
        await eventually(lambda: _fds(pid) >= baseline + 100, within=5, what="100 connections")
        for _r, w in conns:
            w.close()
            await w.wait_closed()
        t = time.monotonic()
        await eventually(lambda: _fds(pid) <= baseline, within=3, what="fds back to baseline")
        assert time.monotonic() - t < 2.5
        assert (await client.status("mic0"))["cards"][0]["state"] == "ready"


@pytest.mark.asyncio
async def test_half_closed_client_still_gets_its_answer(state_dir: Path) -> None:
    async with daemon(state_dir):
        reader, writer = await _open(state_dir)
        writer.write(b'{"id": 5, "op": "wait", "card": "mic0", "state": "ready", "timeout": 5}\n')
        writer.write(b'{"id": 6, "op": "status", "card": "mic0"}\n')
        writer.write_eof()  # socat's way: done sending, still listening
        answers = [json.loads(line) for line in (await reader.read()).splitlines()]
        writer.close()
        assert sorted(a["id"] for a in answers) == [5, 6]
        assert all(a["ok"] for a in answers)


@pytest.mark.asyncio
async def test_too_many_connections_are_refused_then_served_again(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        await client.ping()
        # the client's own connection and MAX_CONNECTIONS - 1 more: all served
        conns = [await _open(state_dir) for _ in range(MAX_CONNECTIONS - 1)]
        for r, w in conns:
            w.write(b'{"id": 1, "op": "ping"}\n')
            assert json.loads(await r.readline())["ok"] is True
        reader, writer = await _open(state_dir)
        refused = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert refused["ok"] is False
        assert "too many connections" in refused["error"]["message"]
        assert await reader.read() == b""
        writer.close()
        for _r, w in conns:
            w.close()
            await w.wait_closed()

        async def served() -> bool:
            r, w = await _open(state_dir)
            try:
                w.write(b'{"id": 2, "op": "ping"}\n')
                return bool(json.loads(await r.readline())["ok"])
            finally:
                w.close()

        await eventually(served, within=5, what="a new connection served")


def _send_unfinished(path: str, n: int, size: int) -> tuple[list[socket.socket], list[bytes]]:
    """``n`` connections each sending ``size`` bytes without a newline; the sockets
    still open and what the daemon answered on the ones it closed."""
    held, answers = [], []
    payload = b"x" * size
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
        held.append(s)
    # the ones over the budget were answered and closed: read what they got
    for s in held:
        s.settimeout(0.2)
        with contextlib.suppress(TimeoutError, OSError):
            answers.append(s.recv(4096))
    return held, answers


@pytest.mark.asyncio
async def test_unfinished_lines_cannot_grow_the_daemon_without_bound(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        pid = (await client.ping())["pid"]
        base_rss = _rss(pid)
        baseline = _fds(pid)
        held, answers = await asyncio.to_thread(
            _send_unfinished, _sock_path(state_dir), 150, MAX_MESSAGE - 4096
        )
        try:
            grown = _rss(pid) - base_rss
            refused = [a for a in answers if b"too many unfinished" in a]
            # at most MAX_UNFINISHED bytes are held; the others were told and closed
            assert len(refused) >= 150 - MAX_UNFINISHED // (MAX_MESSAGE - 4096)
            assert grown < MAX_UNFINISHED + 24 * (1 << 20), f"RSS grew {grown >> 20} MiB"
            # the daemon still answers, and a real request still fits in the budget
            assert (await client.ping())["pid"] == pid
        finally:
            for s in held:
                s.close()
        await eventually(lambda: _fds(pid) <= baseline, within=3, what="fds back to baseline")
        # the budget was given back: a large (valid) request is accepted again
        big = {
            "id": 3,
            "op": "run",
            "card": "mic0",
            "app": "m:f",
            "args": ["y" * (MAX_MESSAGE // 2)],
        }
        reader, writer = await _open(state_dir)
        writer.write(json.dumps(big).encode() + b"\n")
        answer = json.loads(await asyncio.wait_for(reader.readline(), 10))
        writer.close()
        assert answer["id"] == 3
        assert "not online" in answer["error"]["message"]
        assert _rss(pid) - base_rss < MAX_UNFINISHED + 24 * (1 << 20)
