"""virtio-blk host backend and card driver in one process (the VOP rig): request
checks, DISCARD/WRITE_ZEROES, FLUSH ordering, I/O errors, multiqueue, removal."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mic_card.drivers import BlockDevice, BlockIOError
from mic_host.backends import block as be
from mic_host.backends.block import BlockBackend
from tests.vop.rig import Rig
from virtio.blk import REQ_HEADER, SEGMENT
from virtio.constants import BlkFeature, BlkReqType, BlkStatus
from virtio.errors import BrokenResourceError, ConfigError, LocalProtocolError
from virtio.layouts import BlkConfig

S = 512


def blk(rig: Rig, name: str = "vda") -> BlockDevice:
    assert rig.bus is not None
    d = rig.bus.driver(name)
    assert isinstance(d, BlockDevice)
    return d


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "d.img"
    p.write_bytes(bytes(range(256)) * (4 << 20 >> 8))  # 4 MiB, no holes
    return p


def contents(p: Path) -> bytes:
    return p.read_bytes()


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_config_space_and_features(disk: Path) -> None:
    # several backends on one image: the image lock is not what this tests
    b = BlockBackend(disk, num_queues=3, blk_size=4096, serial="S1", force_share=True)
    cfg = BlkConfig.parse(b.config_bytes())
    assert cfg.capacity == (4 << 20) // S
    assert (cfg.blk_size, cfg.num_queues, cfg.size_max) == (4096, 3, be.SIZE_MAX)
    assert cfg.seg_max == 126
    assert cfg.topology.opt_io_size == 256
    assert cfg.max_discard_seg == be.MAX_DISCARD_SEG
    assert cfg.write_zeroes_may_unmap == 1
    f = b.features()
    for bit in ("FLUSH", "MQ", "DISCARD", "WRITE_ZEROES", "BLK_SIZE", "TOPOLOGY", "SIZE_MAX"):
        assert f & BlkFeature[bit], bit
    assert list(b.queue_sizes()) == [128] * 3
    ro = BlockBackend(disk, read_only=True, force_share=True)
    assert ro.features() & BlkFeature.RO
    assert not ro.features() & (BlkFeature.DISCARD | BlkFeature.MQ)
    for bad in ({"num_queues": 9}, {"blk_size": 1000}, {"serial": "x" * 21}):
        with pytest.raises(ConfigError):
            BlockBackend(disk, **bad)
    with pytest.raises(ConfigError, match="multiple of 4096"):
        BlockBackend(disk.with_name("n.img"), create=True, size=6000, blk_size=4096)


@pytest.mark.asyncio
async def test_zero_copy_and_buffered_round_trip(rig: Rig, disk: Path) -> None:
    rig.add(BlockBackend(disk, serial="ABCDEFGHIJKLMNOPQRST"))
    await rig.boot()
    d = blk(rig)
    assert await d.get_id() == b"ABCDEFGHIJKLMNOPQRST"  # exactly 20 bytes, no NUL
    with d.buffer(8192) as buf:
        buf.view[:] = b"\x5a" * 8192
        await d.write(16, buf)
        buf.view[:] = bytes(8192)
        assert await d.read_into(16, buf) == 8192
        assert bytes(buf.view) == b"\x5a" * 8192
    target = bytearray(1024)
    await d.read_into(16, target)
    assert target == b"\x5a" * 1024
    assert contents(disk)[16 * S : 32 * S] == b"\x5a" * 8192
    info = d.info()
    assert info["path"] == "/dev/vda"
    assert (info["discard"], info["write_zeroes"], info["flush"]) == (True, True, True)


async def _raw(d: BlockDevice, readable: list[bytes], writable: list[int]) -> tuple[int, bytes]:
    """Send a hand-made chain: readable buffers with these bytes, writable ones of these sizes.
    Returns (used length, the writable bytes afterwards)."""
    mem = d.dev.mem
    addrs: list[int] = []
    r: list[tuple[int, int]] = []
    w: list[tuple[int, int]] = []
    for data in readable:
        a = d.dev.alloc(len(data))
        mem.view(a, len(data), True)[:] = data
        addrs.append(a)
        r.append((a, len(data)))
    for n in writable:
        a = d.dev.alloc(n)
        mem.view(a, n, True)[:] = b"\xee" * n
        addrs.append(a)
        w.append((a, n))
    used = await d.queue.submit(r, w)
    out = b"".join(bytes(mem.view(a, n)) for a, n in w)
    for a in addrs:
        d.dev.free(a)
    return used, out


def hdr(t: int, sector: int = 0) -> bytes:
    return REQ_HEADER.pack(t, sector)


@pytest.mark.asyncio
async def test_every_bad_request_gets_a_status_and_writes_nothing(rig: Rig, disk: Path) -> None:
    backend = BlockBackend(disk, blk_size=4096)
    rig.add(backend)
    await rig.boot()
    d = blk(rig)
    before = sha(disk)
    cap = d.capacity
    IN, OUT = BlkReqType.IN, BlkReqType.OUT
    cases: list[tuple[str, list[bytes], list[int], int]] = [
        ("short header", [b"\0" * 8], [1], BlkStatus.IOERR),
        ("read with readable data", [hdr(IN), b"x" * 4096], [4096, 1], BlkStatus.IOERR),
        ("write with writable data", [hdr(OUT) + b"x" * 4096], [4096, 1], BlkStatus.IOERR),
        ("write past the end", [hdr(OUT, cap - 8), b"y" * 8192], [1], BlkStatus.IOERR),
        ("write at 2^63", [hdr(OUT, 1 << 63), b"y" * 4096], [1], BlkStatus.IOERR),
        ("write at 2^64-8 (wraps)", [hdr(OUT, (1 << 64) - 8), b"y" * 4096], [1], BlkStatus.IOERR),
        ("write not whole blocks", [hdr(OUT, 0), b"y" * 512], [1], BlkStatus.IOERR),
        ("write misaligned sector", [hdr(OUT, 1), b"y" * 4096], [1], BlkStatus.IOERR),
        ("read past the end", [hdr(IN, cap)], [4096, 1], BlkStatus.IOERR),
        ("get_id short", [hdr(BlkReqType.GET_ID)], [8, 1], BlkStatus.IOERR),
        ("unknown type", [hdr(77)], [1], BlkStatus.UNSUPP),
        ("discard no segment", [hdr(BlkReqType.DISCARD)], [1], BlkStatus.IOERR),
        ("discard torn segment", [hdr(BlkReqType.DISCARD), b"\0" * 10], [1], BlkStatus.IOERR),
        (
            "discard with unmap flag",
            [hdr(BlkReqType.DISCARD), SEGMENT.pack(0, 8, 1)],
            [1],
            BlkStatus.UNSUPP,
        ),
        (
            "write_zeroes reserved flag",
            [hdr(BlkReqType.WRITE_ZEROES), SEGMENT.pack(0, 8, 2)],
            [1],
            BlkStatus.UNSUPP,
        ),
        (
            "write_zeroes past the end",
            [hdr(BlkReqType.WRITE_ZEROES), SEGMENT.pack(cap - 8, 16, 0)],
            [1],
            BlkStatus.IOERR,
        ),
        (
            "discard, second segment out of range",
            [hdr(BlkReqType.DISCARD), SEGMENT.pack(0, 8, 0) + SEGMENT.pack(cap, 8, 0)],
            [1],
            BlkStatus.IOERR,
        ),
    ]
    for what, readable, writable, status in cases:
        used, out = await _raw(d, readable, writable)
        assert out[-1] == status, what
        assert used == 1, what  # the status byte only: no data on an error
    # a chain with no room for a status byte is completed empty, never crashes
    used, _ = await _raw(d, [hdr(IN)], [])
    assert used == 0
    assert sha(disk) == before  # nothing was written anywhere
    assert backend.malformed >= 6
    assert (await d.read(8, 8))[:4] == bytes(range(4))  # still serving
    assert rig.vop.device("block").errors == 0  # refusals are answers, not ring faults


@pytest.mark.asyncio
async def test_discard_punches_holes_and_write_zeroes_zeroes(rig: Rig, disk: Path) -> None:
    rig.add(BlockBackend(disk))
    await rig.boot()
    d = blk(rig)
    blocks_before = os.stat(disk).st_blocks
    await d.discard(2048, 4096)  # 2 MiB in the middle
    data = contents(disk)
    assert data[2048 * S : 6144 * S] == bytes(2 << 20)
    assert data[2047 * S : 2048 * S] == bytes(range(256)) * 2  # neighbours untouched
    assert data[6144 * S : 6145 * S] == bytes(range(256)) * 2
    assert os.stat(disk).st_size == 4 << 20
    if be.punch_hole(os.open(disk, os.O_RDONLY), 0, 0):  # the file system can punch
        assert os.stat(disk).st_blocks < blocks_before
    await d.write_zeroes(1, 3)
    await d.write_zeroes(100, 8, unmap=True)
    assert await d.read(0, 4) == bytes(range(256)) * 2 + bytes(3 * S)
    assert await d.read(100, 8) == bytes(8 * S)
    await d.discard_ranges([(10, 2), (20, 0), (30, 2)])
    assert await d.read(10, 2) == bytes(2 * S)
    with pytest.raises(BlockIOError) as ei:
        await d.discard(d.capacity - 1, 2)
    assert ei.value.status == BlkStatus.IOERR


@pytest.mark.asyncio
async def test_discard_not_offered(rig: Rig, disk: Path) -> None:
    rig.add(BlockBackend(disk, discard=False))
    await rig.boot()
    d = blk(rig)
    with pytest.raises(BlockIOError) as ei:
        await d.discard(0, 8)
    assert ei.value.status == BlkStatus.UNSUPP
    _, out = await _raw(d, [hdr(BlkReqType.DISCARD), SEGMENT.pack(0, 8, 0)], [1])
    assert out[-1] == BlkStatus.UNSUPP


@pytest.mark.asyncio
async def test_flush_fsyncs_after_acknowledged_writes(
    rig: Rig, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_pwritev = os.fsync, os.pwritev

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def pwritev(fd: int, bufs: Any, off: int) -> int:
        events.append(f"write@{off}")
        return real_pwritev(fd, bufs, off)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "pwritev", pwritev)
    rig.add(BlockBackend(disk))
    await rig.boot()
    d = blk(rig)
    await asyncio.gather(*(d.write(8 * i, b"w" * 4096) for i in range(6)))
    await d.write(800, b"big" * (1 << 16) + b"x" * 512 * 0)  # thread path (192 KiB)
    assert "fsync" not in events
    await d.flush()
    assert events[-1] == "fsync"
    assert sum(e.startswith("write@") for e in events[:-1]) == 7


@pytest.mark.asyncio
async def test_write_through_without_flush_feature(
    rig: Rig, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)

    class NoFlush(BlockDevice):
        FEATURES = BlockDevice.FEATURES & ~int(BlkFeature.FLUSH)

    rig.add(BlockBackend(disk))
    await rig.boot(drivers={2: NoFlush})
    d = blk(rig)
    assert not d.flush_supported
    await d.write(0, b"q" * 512)
    assert len(synced) == 1  # acknowledged only once on stable storage


@pytest.mark.asyncio
async def test_file_system_errors_reach_the_status_byte(
    rig: Rig, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = BlockBackend(disk)
    rig.add(backend)
    await rig.boot()
    d = blk(rig)

    def fail(*_: Any) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def nospace(*_: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "preadv", fail)
    with pytest.raises(BlockIOError) as ei:
        await d.read(0, 1)
    assert ei.value.status == BlkStatus.IOERR
    monkeypatch.setattr(os, "pwritev", nospace)
    with pytest.raises(BlockIOError):
        await d.write(0, b"z" * (1 << 20))  # in a worker thread
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(BlockIOError):
        await d.flush()
    monkeypatch.undo()
    assert backend.io_errors == 3
    assert (await d.read(0, 1))[:4] == bytes(range(4))


@pytest.mark.asyncio
async def test_multiqueue_spreads_and_serves_concurrently(
    rig: Rig, disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = BlockBackend(disk, num_queues=4, thread_threshold=0)  # everything in threads
    rig.add(backend)
    await rig.boot()
    d = blk(rig)
    assert d.num_queues == 4
    assert len(d.queues) == 4
    active = 0
    peak = 0
    lock = threading.Lock()
    real = os.preadv

    def slow_preadv(fd: int, bufs: Any, off: int) -> int:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.01)
        with lock:
            active -= 1
        return real(fd, bufs, off)

    monkeypatch.setattr(os, "preadv", slow_preadv)
    got = await asyncio.gather(*(d.read(8 * i, 8) for i in range(32)))
    assert all(g == bytes(range(256)) * 16 for g in got)
    assert all(q.submitted > 0 for q in d.queues)
    assert peak >= 2  # served concurrently, not one after another
    assert sum(ep.buffers for ep in rig.vop.device("block").endpoints) >= 32


@pytest.mark.asyncio
async def test_removal_fails_in_flight_io_cleanly(rig: Rig, disk: Path) -> None:
    rig.add(BlockBackend(disk, num_queues=2))
    await rig.boot()
    d = blk(rig)
    results = await asyncio.gather(
        *(d.write(8 * i, b"r" * 4096) for i in range(200)),
        rig.vop.remove_device("block"),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(e, BrokenResourceError) for e in errors), errors
    with pytest.raises(BrokenResourceError, match="removed"):
        await d.read(0, 1)
    assert rig.cp.heap.free_bytes > 0


@pytest.mark.asyncio
async def test_driver_argument_checks(rig: Rig, disk: Path) -> None:
    rig.add(BlockBackend(disk, blk_size=4096))
    await rig.boot()
    d = blk(rig)
    assert d.blk_size == 4096
    with pytest.raises(LocalProtocolError, match="4096-byte blocks"):
        await d.write(0, b"x" * 512)
    with pytest.raises(LocalProtocolError):
        await d.read(-1, 8)
    assert await d.read(0, 0) == b""


# -- Hypothesis in one process: random I/O against a model, with shrinking ----------------

_op = st.one_of(
    st.tuples(st.just("w"), st.integers(0, 70), st.integers(1, 9), st.integers(0, 255)),
    st.tuples(st.just("r"), st.integers(0, 70), st.integers(1, 9)),
    st.tuples(st.just("z"), st.integers(0, 70), st.integers(1, 9)),
    st.tuples(st.just("f")),
)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(_op, min_size=1, max_size=25), nq=st.integers(1, 3))
def test_random_io_matches_model(tmp_path: Path, ops: list[tuple[Any, ...]], nq: int) -> None:
    path = tmp_path / f"m{nq}.img"
    path.write_bytes(bytes(64 * S))
    model = bytearray(64 * S)

    async def scenario() -> None:
        rig = Rig(config_timeout=2.0, remove_timeout=2.0, drain_timeout=2.0)
        try:
            rig.add(BlockBackend(path, num_queues=nq))
            await rig.boot()
            d = blk(rig)
            for op in ops:
                if op[0] == "f":
                    await d.flush()
                    continue
                sector, count = op[1], op[2]
                lo, hi = sector * S, (sector + count) * S
                inside = hi <= len(model)
                try:
                    if op[0] == "w":
                        data = bytes([op[3]]) * (count * S)
                        await d.write(sector, data)
                        model[lo:hi] = data
                    elif op[0] == "z":
                        await d.write_zeroes(sector, count)
                        model[lo:hi] = bytes(hi - lo)
                    else:
                        assert await d.read(sector, count) == bytes(model[lo:hi])
                    assert inside
                except BlockIOError as e:
                    status = e.status
                    assert not inside
                    assert status == BlkStatus.IOERR
        finally:
            await rig.aclose()

    asyncio.run(scenario())
    assert path.read_bytes() == bytes(model)


# -- images that make no disk, and images the backend creates -------------------------


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: os.mkfifo(p), "is a FIFO: an image must be a regular file or a block device"),
        (lambda p: p.touch(), "is empty: an image must hold at least one 512-byte block"),
        (lambda p: p.write_bytes(b"x" * 511), "holds 511 B, less than one 512-byte block"),
        (lambda p: p.mkdir(), "directory"),  # read-write: EISDIR from open
    ],
)
@pytest.mark.parametrize("read_only", [False, True])
def test_image_must_be_a_file_or_block_device_with_a_block(
    tmp_path: Path, make: Any, problem: str, read_only: bool
) -> None:
    path = tmp_path / "bad.img"
    make(path)
    # a FIFO opened read-only must not block the daemon waiting for a writer
    with pytest.raises(ConfigError, match=rf"^block vdz: .*{path}") as ei:
        BlockBackend(path, name="vdz", read_only=read_only)
    assert problem in str(ei.value)


@pytest.mark.parametrize("dev", ["/dev/zero", "/dev/null"])
def test_character_devices_are_refused(dev: str) -> None:
    with pytest.raises(ConfigError, match=rf"^block vdz: {dev} is a character device"):
        BlockBackend(dev, name="vdz")


def _block_device() -> tuple[str, int] | None:
    """A readable, non-empty block device and its size, if the machine has one."""
    for dev in ("/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/loop0"):
        try:
            fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        if size:
            return dev, size
    return None


def test_capacity_of_a_block_device_is_its_size() -> None:
    # st_size of a block device is 0: its size is where lseek(SEEK_END) lands
    found = _block_device()
    if found is None:
        pytest.skip("no readable, non-empty block device")
    dev, size = found
    b = BlockBackend(dev, read_only=True)  # read-only: nothing is ever written to it
    asyncio.run(b.aclose())
    assert b.capacity == size // S


def test_a_block_device_is_sized_by_lseek(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no block device can be opened (a container): the same path, with the
    regular file made to look like one (st_size 0, as the kernel reports)."""
    import stat as st

    from mic_host.config import files

    real = os.fstat

    def as_block_device(fd: int) -> os.stat_result:
        r = list(real(fd))
        r[0] = st.S_IFBLK | 0o600
        r[6] = 0  # st_size
        return os.stat_result(r)

    monkeypatch.setattr(files.os, "fstat", as_block_device)
    b = BlockBackend(disk, read_only=True)
    asyncio.run(b.aclose())
    assert b.capacity == (4 << 20) // S


def test_created_images_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        b = BlockBackend(tmp_path / "new.img", create=True, size=1 << 20)
    finally:
        os.umask(old)
    asyncio.run(b.aclose())
    st = (tmp_path / "new.img").stat()
    assert (st.st_size, st.st_mode & 0o777) == (1 << 20, 0o600)


def test_an_image_too_large_for_the_file_system_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def efbig(fd: int, size: int) -> None:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(be.os, "ftruncate", efbig)  # ext4 does this above 16 TiB
    path = tmp_path / "huge.img"
    with pytest.raises(
        ConfigError,
        match=rf"^block vdz: cannot create {path} with size = 100T: File too large: "
        "the file system's largest file is smaller",
    ):
        BlockBackend(path, name="vdz", create=True, size=100 << 40)
    assert not path.exists()  # nothing half-made is left for the next boot to open


def test_queue_size_below_a_request_is_refused(disk: Path) -> None:
    for n in (1, 2):
        with pytest.raises(ConfigError, match=f"queue_size {n} below 4"):
            BlockBackend(disk, queue_size=n)


def _attach_args(**kw: Any) -> Any:
    import argparse

    base = {"card": "mic0", "copy_from": None, "preallocate": False, "create": False}
    return argparse.Namespace(**(base | kw))


def test_micctl_made_images_are_private_and_sources_must_end(tmp_path: Path) -> None:
    from mic_host.micctl.images import prepare_block_image

    src = tmp_path / "src.img"
    src.write_bytes(b"data" * 1024)
    old = os.umask(0)
    try:
        opts: dict[str, Any] = {"image": "copy.img", "size": 1 << 20}
        made = prepare_block_image(tmp_path, _attach_args(copy_from=str(src)), opts)
        opts = {"image": "pre.img", "size": 1 << 20, "create": True}
        pre = prepare_block_image(tmp_path, _attach_args(preallocate=True, create=True), opts)
    finally:
        os.umask(old)
    assert made is not None
    assert pre is not None
    for p in (made, pre):
        assert (p.stat().st_mode & 0o777, p.stat().st_size) == (0o600, 1 << 20)
    assert made.read_bytes()[:4096] == src.read_bytes()
    # a FIFO or /dev/zero as the source would never end: refused, nothing left behind
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad, kind in ((str(fifo), "a FIFO"), ("/dev/zero", "a character device")):
        with pytest.raises(ConfigError, match=f"is {kind}"):
            prepare_block_image(tmp_path, _attach_args(copy_from=bad), {"image": "c2.img"})
        assert not (tmp_path / "c2.img").exists()


@pytest.mark.asyncio
async def test_image_lock_matrix(tmp_path: Path) -> None:
    """QEMU's rules: a writer excludes everything, readers share, force_share skips
    the test; a whole-file exclusive lock (another tool) is a holder too."""
    import fcntl
    import struct

    from mic_host.backends.imagelock import ImageLockedError

    img = tmp_path / "l.img"
    img.write_bytes(bytes(4096))
    w = BlockBackend(img, name="w")
    for kw in ({}, {"read_only": True}):
        with pytest.raises(ImageLockedError, match=r"in use by device 'w' \(read-write"):
            BlockBackend(img, name="x", **kw)
    forced = BlockBackend(img, name="f", force_share=True)
    await forced.aclose()
    await w.aclose()
    readers = [BlockBackend(img, name=f"r{i}", read_only=True) for i in range(2)]
    with pytest.raises(ImageLockedError, match=r"device 'r0' .*; device 'r1' "):
        BlockBackend(img, name="x")
    for r in readers:
        await r.aclose()
    fd = os.open(img, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        with pytest.raises(ImageLockedError, match="in use by another process"):
            BlockBackend(img, name="x", read_only=True)
    finally:
        os.close(fd)
    await BlockBackend(img, name="free").aclose()  # every lock went with its image
