"""``kill -9`` of ``mic-vhost-user blk`` in the middle of a guest's write storm loses nothing.

A Linux guest under QEMU TCG (``vhost-user-blk-pci`` on a chardev with
``reconnect=1``) runs parallel ``dd oflag=direct`` writers and a final
``sync``. When the first (short) writer is done and the others are still
writing, the back-end process is killed with SIGKILL and started again on the
same socket and image. QEMU reconnects and hands it the inflight region
(INFLIGHT_SHMFD) it kept; the new back-end resubmits what the dead one had
taken. The guest sees no I/O error, every writer and the flush succeed, and
the image holds exactly what each writer wrote (hashes of the ranges, on the
host). Skips (with the reason) where QEMU, a kernel or a static busybox is
missing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.vhost_user.guest import Guest, build_initramfs, find_guest_kit
from tests.vhost_user.test_guest_blk import _wait_ready
from transport.vhost_user.protocol import INFLIGHT_HDR

MiB = 1 << 20
IMAGE_MIB = 40
QUEUE_SIZE = 128
WRITERS = 8  # writer 0 writes 256 KiB, the others 4 MiB each (at i * 4 MiB)

CHECKS = r"""
set -o pipefail
h() { sha256sum | cut -d' ' -f1; }
# prep N: the data of N writers in /tmp/s$i, and its hash
prep() {
    dd if=/dev/urandom of=/tmp/s0 bs=64k count=4 2>/dev/null || return 1
    for i in $(seq 1 $(($1 - 1))); do
        dd if=/dev/urandom of=/tmp/s$i bs=1M count=4 2>/dev/null || return 1
    done
    for i in $(seq 0 $(($1 - 1))); do echo "HASH $i $(h </tmp/s$i)"; done
}
# storm N: N parallel O_DIRECT writers (4 KiB requests), then a flush
storm() {
    for i in $(seq 0 $(($1 - 1))); do
        (if dd if=/tmp/s$i of=/dev/vda bs=4k seek=$((i * 1024)) oflag=direct \
                conv=notrunc 2>/tmp/e$i; then
            echo "WROTE $i"
        else
            echo "WFAIL $i $(cat /tmp/e$i)"
        fi) &
    done
    wait
    if sync; then echo "SYNC""ED"; else echo "SYNC-FAILED"; fi
}
"""

KIT = find_guest_kit()
pytestmark = [
    pytest.mark.skipif(isinstance(KIT, str), reason=str(KIT)),
    pytest.mark.timeout(240),
]


def _server(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as logf:
        proc = subprocess.Popen(argv, stderr=logf, stdout=subprocess.DEVNULL)
    _wait_ready(proc, log)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _inflight_fd(pid: int) -> Path:
    """The server's mapping of the inflight region (mmap keeps its fd open)."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        if "mic-vhost-user-inflight" in os.readlink(fd):
            return fd
    raise AssertionError("mic-vhost-user holds no inflight region: INFLIGHT_SHMFD not used")


def _kill_holding_requests(proc: subprocess.Popen[bytes], guest: Guest) -> int:
    """SIGKILL ``proc`` at a moment it holds requests (checked in its inflight region,
    the process stopped); how many it held."""
    fd = _inflight_fd(proc.pid)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert len(re.findall(r"WROTE \d", guest.output)) < WRITERS, "storm over before a kill"
        proc.send_signal(signal.SIGSTOP)
        region = fd.read_bytes()
        held = sum(region[INFLIGHT_HDR.size + 16 * h] for h in range(QUEUE_SIZE))
        if held:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return held
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)  # a poll interval, not a wait for anything
    raise AssertionError("mic-vhost-user never held a request for 120 s")


def test_kill_mid_storm_loses_no_write(tmp_path: Path) -> None:
    assert not isinstance(KIT, str)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(IMAGE_MIB * MiB))
    sock = tmp_path / "vu.sock"
    exe = shutil.which("mic-vhost-user", path=str(Path(sys.executable).parent)) or "mic-vhost-user"
    argv = [exe, "blk", "--socket", str(sock), "--image", str(image), "--log-level", "info"]
    first = _server(argv, tmp_path / "first.log")
    second: subprocess.Popen[bytes] | None = None
    initrd = tmp_path / "initrd.cpio"
    build_initramfs(KIT, initrd, CHECKS)
    guest = Guest(
        [
            KIT.qemu,
            "-machine",
            "pc,accel=tcg,memory-backend=mem",
            "-smp",
            "2",
            "-m",
            "256M",
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-kernel",
            str(KIT.kernel),
            "-initrd",
            str(initrd),
            "-append",
            "console=ttyS0 panic=-1 loglevel=3",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-chardev",
            f"socket,id=vu,path={sock},reconnect=1",
            "-device",
            "vhost-user-blk-pci,chardev=vu,num-queues=1",
        ],
        tmp_path / "console.log",
    )
    try:
        guest.wait_for("GUEST-UP", 120)
        hashes = {
            int(i): h
            for i, h in re.findall(r"HASH (\d+) ([0-9a-f]{64})", guest.run(f"prep {WRITERS}"))
        }
        assert sorted(hashes) == list(range(WRITERS))
        assert guest.proc.stdin is not None
        guest.proc.stdin.write(f'storm {WRITERS}; echo "STORM""-END"\n'.encode())
        guest.proc.stdin.flush()
        guest.wait_for(r"WROTE 0\b", 120)
        held = _kill_holding_requests(first, guest)
        second = _server(argv, tmp_path / "second.log")
        guest.wait_for("STORM-END", 180)
        out = guest.output.split("STORM-END")[-2]
        assert "WFAIL" not in out, out
        assert sorted(int(i) for i in re.findall(r"WROTE (\d)", out)) == list(range(WRITERS))
        assert "SYNCED" in out, out
        assert "I/O error" not in guest.run("dmesg"), "the guest saw an I/O error"
        log = (tmp_path / "second.log").read_text()
        m = re.search(r"resubmitting (\d+) requests \((\d+) were done\)", log)
        assert m is not None, log
        assert int(m[1]) + int(m[2]) == held, log
        assert "ERROR" not in log, log
        data = image.read_bytes()
        for i, want in hashes.items():
            size = 256 * 1024 if i == 0 else 4 * MiB
            got = hashlib.sha256(data[i * 4 * MiB : i * 4 * MiB + size]).hexdigest()
            assert got == want, f"writer {i}: the image does not hold what it wrote"
    finally:
        guest.close()
        _stop(first)
        if second is not None:
            _stop(second)
