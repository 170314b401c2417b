"""The guest helper's initramfs: a valid newc archive, modules decompressed for busybox."""

from __future__ import annotations

import lzma
from pathlib import Path

from tests.vhost_user.guest import GuestKit, build_initramfs


def _read_newc(raw: bytes) -> dict[str, tuple[int, bytes]]:
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert raw[pos : pos + 6] == b"070701"
        fields = [int(raw[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = raw[pos : pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        data = raw[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data)


def test_initramfs_holds_busybox_modules_and_init(tmp_path: Path) -> None:
    plain = tmp_path / "virtio.ko"
    plain.write_bytes(b"\x7fELF plain")
    packed = tmp_path / "virtio_blk.ko.xz"
    packed.write_bytes(lzma.compress(b"\x7fELF blk"))
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    kit = GuestKit("qemu", tmp_path / "vmlinuz", [plain, packed], busybox)
    build_initramfs(kit, tmp_path / "initrd", "f() { :; }\n")
    files = _read_newc((tmp_path / "initrd").read_bytes())
    assert files["lib/modules/virtio.ko"][1] == b"\x7fELF plain"
    assert files["lib/modules/virtio_blk.ko"][1] == b"\x7fELF blk"
    assert files["bin/busybox"] == (0o100755, b"\x7fELF busybox")
    assert files["checks.sh"][1] == b"f() { :; }\n"
    init = files["init"][1].decode()
    assert init.index("insmod /lib/modules/virtio.ko") < init.index(
        "insmod /lib/modules/virtio_blk.ko"
    )
    assert files["dev"][0] == 0o040755
