"""``mic-vhost-user`` as a user runs it: ready only once the socket listens, stops on
SIGTERM/SIGINT, refuses bad arguments and an occupied socket with a clear message."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

EXE = shutil.which("mic-vhost-user", path=str(Path(sys.executable).parent)) or "mic-vhost-user"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vu-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _start(d: Path, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    image = d / "disk.img"
    if not image.exists():
        image.write_bytes(bytes(1 << 20))
    sock = d / "vu.sock"
    proc = subprocess.Popen(
        [EXE, "blk", "--socket", str(sock), "--image", str(image), *extra],
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, sock


def _ready(proc: subprocess.Popen[str], sock: Path) -> str:
    assert proc.stderr is not None
    line = proc.stderr.readline()  # blocks until the first log line (or exit)
    assert "ready:" in line, line + proc.stderr.read()
    # the socket was listening before the line was written
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
    return line


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_until_signalled(short_dir: Path, sig: signal.Signals) -> None:
    proc, sock = _start(short_dir, "--serial", "abc", "--queues", "2")
    try:
        line = _ready(proc, sock)
        assert str(sock) in line
        assert "2 queue(s)" in line
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_occupied_socket_is_refused(short_dir: Path) -> None:
    first, sock = _start(short_dir, "--read-only")
    try:
        _ready(first, sock)
        second = subprocess.run(
            [
                EXE,
                "blk",
                "--socket",
                str(sock),
                "--image",
                str(short_dir / "disk.img"),
                "--read-only",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert "already listening" in second.stderr
    finally:
        first.terminate()
        first.wait(timeout=30)
        assert first.stderr is not None
        first.stderr.close()


def test_stale_socket_file_is_replaced(short_dir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(short_dir / "vu.sock"))
    stale.close()  # the file stays, nobody listens
    proc, sock = _start(short_dir)
    try:
        _ready(proc, sock)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--image", "/nonexistent/disk.img"], 1, "/nonexistent/disk.img"),
        (["--queues", "9"], 1, "num_queues 9"),
        (["--queue-size", "100"], 2, "--queue-size 100"),
        (["--serial", "x" * 21], 1, "serial longer than 20"),
    ],
)
def test_bad_arguments(short_dir: Path, args: list[str], code: int, words: str) -> None:
    image = short_dir / "disk.img"
    image.write_bytes(bytes(1 << 20))
    argv = [EXE, "blk", "--socket", str(short_dir / "vu.sock"), "--image", str(image), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert words in done.stderr
    assert not (short_dir / "vu.sock").exists()
