"""Image locks (issue 15 item 4), through real daemons, cards and ``micctl``.

Read-write is exclusive across devices of one card, cards and daemons; read-only
may be shared; a refusal names the holder (card, device, daemon pid); the
``force_share`` option / ``micctl attach --force-share`` overrides; the lock goes
with the image (detach, card stop, daemon exit); and QEMU's lock bytes are
honoured both ways.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import pytest

from mic_host.backends.imagelock import LOCK_PERM_BASE, LOCK_SHARED_BASE
from tests.integration.helpers import booted, card_toml, config, daemon, micctl
from virtio.errors import MicError


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("micctl: "), lines[0]
    return lines[0]


@pytest.mark.asyncio
async def test_same_image_twice_on_one_card_is_refused_naming_the_holder(
    state_dir: Path,
) -> None:
    async with daemon(state_dir) as client:
        card = await booted(client)
        disk = str(state_dir / "mic0.img")  # vda, the config's disk named "disk"
        pid = (await client.ping())["pid"]
        r = await micctl(state_dir, "attach", "mic0", "block", "--image", disk)
        assert r.rc == 1, r
        line = _one_error_line(r.err)
        assert f"{disk} is in use by mic0 device 'disk' (read-write, this mic-host pid {pid})" in (
            line
        )
        assert "cannot open it read-write" in line
        assert "--force-share" in line
        # read-only is refused too: the writer does not share
        r = await micctl(state_dir, "attach", "mic0", "block", "--image", disk, "--read-only")
        assert r.rc == 1
        assert "cannot open it read-only" in _one_error_line(r.err)
        assert [d["device"] for d in (await card.status())["devices"]] == ["hvc0", "vda"]
        # the explicit override
        r = await micctl(state_dir, "attach", "mic0", "block", "--image", disk, "--force-share")
        assert (r.rc, r.out) == (0, "vdb\n"), r
        assert (await micctl(state_dir, "detach", "mic0", "vdb")).rc == 0


@pytest.mark.asyncio
async def test_read_only_is_shared_and_detach_releases(state_dir: Path) -> None:
    image = state_dir / "shared.img"
    image.write_bytes(b"\0" * (1 << 20))
    async with daemon(state_dir) as client:
        card = await booted(client)
        ro = ["attach", "mic0", "block", "--image", str(image), "--read-only"]
        assert (await micctl(state_dir, *ro)).out == "vdb\n"
        assert (await micctl(state_dir, *ro)).out == "vdc\n"
        r = await micctl(state_dir, "attach", "mic0", "block", "--image", str(image))
        assert r.rc == 1
        line = _one_error_line(r.err)
        # both readers, by what the user knows of them (they named neither)
        assert f"{image} is in use by a disk of mic0 (read-only, this mic-host pid " in line
        assert line.count("a disk of mic0 (read-only") == 2, line
        assert "block" not in line.split(": ", 1)[1].replace("--force-share", ""), line
        await card.detach("vdb")
        await card.detach("vdc")
        # the readers are gone: a writer may have it now
        r = await micctl(state_dir, "attach", "mic0", "block", "--image", str(image))
        assert (r.rc, r.out) == (0, "vdb\n"), r


@pytest.mark.asyncio
async def test_exclusive_across_daemons_until_stop_or_exit(state_dir: Path) -> None:
    shared = state_dir / "shared.img"
    other_dir = Path(tempfile.mkdtemp(prefix="mic", dir="/tmp"))
    try:
        cfg = config(card_toml("mic0", disk=str(shared)))
        async with daemon(state_dir, cfg) as first:
            pid = (await first.ping())["pid"]
            card = await booted(first)
            async with daemon(other_dir, cfg) as second:
                # the second daemon's card cannot boot on the image: the reason names the holder
                with pytest.raises(MicError, match="boot failed"):
                    await second.card("mic0").boot(wait=True, timeout=30)
                err = (await second.card("mic0").status())["last_error"]
                want = f"{shared} is in use by mic0 device 'disk' (read-write, mic-host pid {pid}, "
                assert want + f"state dir {state_dir})" in err, err
                # the card stops: the lock goes with it
                await card.shutdown(wait=True)
                await second.card("mic0").reset()
                await booted(second)
                with pytest.raises(MicError, match=f"in use by mic0 device 'disk'.*{other_dir}"):
                    await first.card("mic0").boot(wait=True, timeout=30)
            # the second daemon exited (its card with it): the first boots again
            await first.card("mic0").reset()
            await booted(first)
    finally:
        import shutil

        shutil.rmtree(other_dir, ignore_errors=True)


_QEMU = f"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
# what a QEMU with a read-write virtio-blk disk holds (block/file-posix.c)
for byte in ({LOCK_PERM_BASE}, {LOCK_PERM_BASE + 1}, {LOCK_PERM_BASE + 2},
             {LOCK_SHARED_BASE + 1}, {LOCK_SHARED_BASE + 3}):
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, byte, 1, 0))
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.asyncio
async def test_qemu_lock_bytes_are_honoured(state_dir: Path) -> None:
    image = state_dir / "vm.img"
    image.write_bytes(b"\0" * (1 << 20))
    qemu = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _QEMU,
        str(image),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert qemu.stdout is not None
        assert await qemu.stdout.readline() == b"locked\n"
        async with daemon(state_dir) as client:
            await booted(client)
            r = await micctl(state_dir, "attach", "mic0", "block", "--image", str(image))
            assert r.rc == 1
            assert "in use by another process" in _one_error_line(r.err)
            # a lock the daemon holds is seen by QEMU's test (F_OFD_GETLK on byte 201)
            fd = os.open(state_dir / "mic0.img", os.O_RDONLY)
            try:
                import fcntl
                import struct

                probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, LOCK_SHARED_BASE + 1, 1, 0)
                got = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))
                assert got[0] == fcntl.F_RDLCK
            finally:
                os.close(fd)
    finally:
        assert qemu.stdin is not None
        qemu.stdin.close()
        await qemu.wait()
