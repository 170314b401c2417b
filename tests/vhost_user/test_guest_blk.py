"""A Linux guest's virtio-blk disk is ``mic-vhost-user blk``: real QEMU, real driver.

One guest boot per ring configuration (EVENT_IDX and INDIRECT_DESC on, then
both off with two queues, then the packed ring: ``packed=on``, with both on)
under QEMU TCG with ``-smp 2`` (QEMU 7.2's single-vCPU TCG may drop
guest barriers, which would hide a lost notification of ours). The back-end is
the installed ``mic-vhost-user`` command in its own process, and every check
compares what the guest read or wrote with the image on the host: buffered and
O_DIRECT reads and writes, fsync, discard, 16 parallel readers, read-back after
dropping the guest's page cache, the serial and the limits the guest derived
from the config space. Skips (with the reason) where QEMU, a kernel or a static
busybox is missing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.vhost_user.guest import Guest, build_initramfs, find_guest_kit

MiB = 1 << 20
IMAGE_MIB = 64
SERIAL = "mic-vu-test"

#: Shell functions the guest's interactive shell reads ($ENV).
CHECKS = r"""
set -o pipefail
h() { sha256sum | cut -d' ' -f1; }
# rd OFFSET_MIB COUNT_MIB [dd flags]: hash of what the disk holds there
rd() { dd if=/dev/vda bs=1M skip=$1 count=$2 $3 2>/dev/null | h; }
# wr OFFSET_MIB COUNT_MIB [dd flags]: write fresh random data there; its hash
wr() {
    dd if=/dev/urandom of=/tmp/w bs=1M count=$2 2>/dev/null || return 1
    h </tmp/w
    dd if=/tmp/w of=/dev/vda bs=1M seek=$1 conv=notrunc $3 2>/dev/null
}
# par: 16 readers at once, 1 MiB each from 32 MiB on, in 4 KiB O_DIRECT reads
par() {
    for i in $(seq 0 15); do
        (dd if=/dev/vda bs=4k skip=$(( (32 + i) * 256 )) count=256 iflag=direct \
            2>/dev/null | h > /tmp/p$i) &
    done
    wait
    for i in $(seq 0 15); do echo "$i $(cat /tmp/p$i)"; done
}
"""

_HASH = re.compile(r"^[0-9a-f]{64}$", re.M)

KIT = find_guest_kit()
pytestmark = [
    pytest.mark.skipif(isinstance(KIT, str), reason=str(KIT)),
    pytest.mark.timeout(240),
]


@dataclass
class Booted:
    guest: Guest
    image: Path
    server: subprocess.Popen[bytes]
    server_log: Path
    ring_features: bool
    queues: int
    packed: bool = False

    def host_hash(self, off_mib: int, count_mib: int) -> str:
        with self.image.open("rb") as f:
            f.seek(off_mib * MiB)
            return hashlib.sha256(f.read(count_mib * MiB)).hexdigest()

    def guest_hash(self, command: str, timeout: float = 90.0) -> str:
        found = _HASH.findall(self.guest.run(command, timeout))
        assert len(found) == 1, f"{command!r} printed {found}"
        return str(found[0])


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while b"ready:" not in log.read_bytes():
        if proc.poll() is not None:
            raise AssertionError(f"mic-vhost-user exited {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"mic-vhost-user not ready after {timeout} s:\n{log.read_text()}")
        time.sleep(0.05)


@pytest.fixture(
    scope="module",
    params=["event_idx+indirect", "no event_idx, no indirect, 2 queues", "packed"],
)
def booted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Booted]:
    assert not isinstance(KIT, str)
    d = tmp_path_factory.mktemp("vhost-user-guest")
    image = d / "disk.img"
    image.write_bytes(os.urandom(IMAGE_MIB * MiB))
    sock = d / "vu.sock"
    server_log = d / "mic-vhost-user.log"
    exe = shutil.which("mic-vhost-user", path=str(Path(sys.executable).parent)) or "mic-vhost-user"
    packed = request.param == "packed"
    on = request.param != "no event_idx, no indirect, 2 queues"
    queues = 1 if on else 2
    argv = [exe, "blk", "--socket", str(sock), "--image", str(image), "--serial", SERIAL]
    argv += ["--queues", str(queues)]
    with server_log.open("wb") as logf:
        server = subprocess.Popen(
            argv,
            stderr=logf,
            stdout=subprocess.DEVNULL,
        )
    guest: Guest | None = None
    try:
        _wait_ready(server, server_log)
        initrd = d / "initrd.cpio"
        build_initramfs(KIT, initrd, CHECKS)
        ring = "" if on else ",event_idx=off,indirect_desc=off"
        ring += ",packed=on" if packed else ""
        argv = [
            KIT.qemu,
            "-machine", "pc,accel=tcg,memory-backend=mem",
            "-smp", "2",
            "-m", "256M",
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
            "-kernel", str(KIT.kernel),
            "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 loglevel=3",
            "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-nodefaults", "-no-reboot",
            "-chardev", f"socket,id=vu,path={sock}",
            "-device", f"vhost-user-blk-pci,chardev=vu,num-queues={queues}{ring}",
        ]  # fmt: skip
        guest = Guest(argv, d / "console.log")
        guest.wait_for("GUEST-UP", 120)
        yield Booted(guest, image, server, server_log, on, queues, packed)
    finally:
        if guest is not None:
            guest.close()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_device_as_configured(booted: Booted) -> None:
    out = booted.guest.run(
        "cat /sys/block/vda/size; cat /sys/block/vda/serial; echo; "
        "cat /sys/block/vda/queue/write_cache /sys/block/vda/queue/max_segments "
        "/sys/block/vda/queue/discard_max_bytes /sys/block/vda/device/features"
    ).split()
    size, serial, *cache, max_segments, discard_max, features = out
    assert int(size) == IMAGE_MIB * MiB // 512
    assert serial == SERIAL
    assert cache == ["write", "back"]  # FLUSH negotiated: fsync reaches the image
    assert int(max_segments) == 126  # seg_max derived from the 128-entry ring
    assert int(discard_max) > 0
    # the guest's feature bitmap: bit 28 INDIRECT_DESC, 29 EVENT_IDX, 32 VERSION_1,
    # 34 RING_PACKED (offered always; QEMU asks for it with packed=on only)
    assert features[32] == "1"
    assert features[28] == features[29] == ("1" if booted.ring_features else "0")
    assert features[34] == ("1" if booted.packed else "0")


def test_buffered_and_direct_reads(booted: Booted) -> None:
    assert booted.guest_hash("rd 0 8") == booted.host_hash(0, 8)
    assert booted.guest_hash("rd 8 8 iflag=direct") == booted.host_hash(8, 8)


def test_direct_write(booted: Booted) -> None:
    written = booted.guest_hash("wr 16 4 oflag=direct")
    assert booted.host_hash(16, 4) == written


def test_buffered_write_and_fsync(booted: Booted) -> None:
    written = booted.guest_hash("wr 20 4 conv=fsync")
    assert booted.host_hash(20, 4) == written


def test_reads_back_after_dropping_the_page_cache(booted: Booted) -> None:
    booted.guest.run("echo 3 > /proc/sys/vm/drop_caches")
    assert booted.guest_hash("rd 16 8") == booted.host_hash(16, 8)


def test_discard(booted: Booted) -> None:
    booted.guest.run(f"blkdiscard -o {24 * MiB} -l {4 * MiB} /dev/vda")
    zeros = hashlib.sha256(bytes(4 * MiB)).hexdigest()
    assert booted.host_hash(24, 4) == zeros
    assert booted.guest_hash("rd 24 4 iflag=direct") == zeros


def test_parallel_readers(booted: Booted) -> None:
    out = booted.guest.run("par", timeout=120)
    got = dict(line.split() for line in out.strip().splitlines())
    assert len(got) == 16
    for i in range(16):
        assert got[str(i)] == booted.host_hash(32 + i, 1), f"reader {i}"


def test_queues_as_configured(booted: Booted) -> None:
    out = booted.guest.run("ls /sys/block/vda/mq")
    assert sorted(out.split()) == [str(i) for i in range(booted.queues)]


def test_driver_reload_restarts_the_rings(booted: Booted) -> None:
    # the device is reset (GET_VRING_BASE after the in-flight requests) and set
    # up again from index 0; the disk then reads as before
    booted.guest.run(
        "rmmod virtio_blk && insmod /lib/modules/virtio_blk.ko && "
        "while [ ! -b /dev/vda ]; do sleep 0.1; done",
        timeout=90,
    )
    assert booted.guest_hash("rd 0 8 iflag=direct") == booted.host_hash(0, 8)
    assert booted.guest_hash("rd 16 4") == booted.host_hash(16, 4)


def test_backend_logged_no_error(booted: Booted) -> None:
    booted.guest.run("sync")
    assert booted.server.poll() is None
    text = booted.server_log.read_text()
    assert "ERROR" not in text, text
    assert "WARNING" not in text, text
