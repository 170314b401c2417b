"""``mic-vhost-user net`` as a user runs it: ready once the socket listens, stops on
SIGTERM, creates (and removes) its TAP with the host address, carries frames between
two guests on its own switch, refuses bad arguments with a clear message."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.vhost_user.net_frontend import NetFrontEnd, frame
from tests.vhost_user.test_cli import EXE, short_dir
from transport.tap import ip_sync, tap_privilege_problem
from transport.vhost_user import ProtocolFeature

__all__ = ["short_dir"]

PROBLEM = tap_privilege_problem()


def _serve(sock: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [EXE, "net", "--socket", str(sock), *args], stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # blocks until the first log line (or exit)
    assert "ready:" in line, line + proc.stderr.read()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))  # listening before the line was written
    return proc, line


async def _front_end(path: Path) -> NetFrontEnd:
    fe = await NetFrontEnd.connect(path)
    assert isinstance(fe, NetFrontEnd)
    await fe.negotiate_net(int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK))
    await fe.start_net()
    return fe


def _stop(proc: subprocess.Popen[str], sig: signal.Signals = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_switch_serves_until_signalled(short_dir: Path) -> None:
    sock = short_dir / "n.sock"
    proc, line = _serve(sock, "--switch", "lan")
    assert f"serving switch lan on {sock}" in line
    assert _stop(proc, signal.SIGINT) == 0
    assert not sock.exists()


@pytest.mark.asyncio
async def test_two_guests_on_the_process_switch(short_dir: Path) -> None:
    a, b = short_dir / "a.sock", short_dir / "b.sock"
    proc, line = _serve(a, "--socket", str(b), "--switch", "lan")
    try:
        assert f"serving switch lan on {a}, {b}" in line
        fa, fb = await _front_end(a), await _front_end(b)
        try:
            fb.post_rx(2)
            payload = os.urandom(256)
            fa.send_frame(frame(1, payload))
            token, length = await fb.used(0)
            assert fb.rx_frame(token, length) == frame(1, payload)
        finally:
            fa.close()
            fb.close()
    finally:
        assert _stop(proc) == 0
    assert not a.exists()
    assert not b.exists()


@pytest.mark.skipif(PROBLEM is not None, reason=f"TAP unavailable: {PROBLEM}")
def test_tap_is_created_with_the_host_address_and_removed(short_dir: Path) -> None:
    sock = short_dir / "n.sock"
    tap = f"vuc{uuid.uuid4().hex[:6]}"
    addr = f"10.214.{20 + os.getpid() % 200}.1/24"
    proc, line = _serve(sock, "--tap", tap, "--host-ip", addr, "--mtu", "9000")
    try:
        assert f"serving TAP {tap} on {sock}" in line
        shown = ip_sync("-o", "addr", "show", "dev", tap)
        assert addr in shown
        assert "mtu 9000" in ip_sync("-o", "link", "show", "dev", tap)
    finally:
        assert _stop(proc) == 0
    assert tap not in ip_sync("-o", "link", "show")


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--tap", "t0", "--switch", "s0"], 2, "not allowed with argument"),
        ([], 2, "one of the arguments --tap --switch is required"),
        (["--tap", "t0", "--uplink", "u0"], 1, "--uplink needs --switch"),
        (["--switch", "s0", "--mtu", "10"], 1, "mtu 10 outside 68..65535"),
        (["--tap", "bad name"], 1, "bad interface name 'bad name'"),
        (["--tap", "t0", "--socket", "/tmp/second.sock"], 2, "one guest per TAP"),
    ],
)
def test_bad_arguments(short_dir: Path, args: list[str], code: int, words: str) -> None:
    sock = short_dir / "n.sock"
    done = subprocess.run(
        [EXE, "net", "--socket", str(sock), *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == code, done.stderr
    assert words in done.stderr
    assert not sock.exists()
