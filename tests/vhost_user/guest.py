"""A throwaway Linux guest under QEMU TCG, driven through its serial console.

:func:`find_guest_kit` locates what a boot needs (``qemu-system-x86_64``, a
kernel from Debian's ``linux-image-amd64`` with its virtio modules, a static
busybox) or says what is missing; :func:`build_initramfs` writes a newc cpio
archive (no ``cpio`` binary needed) holding busybox, the virtio-blk modules in
dependency order and an ``/init`` that mounts the pseudo file systems, sources
the caller's shell functions and starts a shell on the console.
:class:`Guest` runs QEMU and its console: :meth:`Guest.run` types one command
and waits for its exit status on a marker the echoed command line cannot
contain (no fixed sleeps anywhere).
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Guest", "GuestKit", "build_initramfs", "find_guest_kit"]

#: Modules virtio-blk and virtio-net over PCI need (with their dependencies, from modules.dep).
_WANTED = ("virtio_blk", "virtio_pci", "virtio_net")


@dataclass(frozen=True)
class GuestKit:
    qemu: str
    kernel: Path
    modules: list[Path]  # in load order
    busybox: Path


_DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {
    ".ko": lambda b: b,
    ".xz": lzma.decompress,
    ".gz": gzip.decompress,
}


def _module_order(moddir: Path) -> list[Path]:
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        for d in deps.get(mod, []):
            visit(d)
        if mod not in order:
            order.append(mod)

    for name in _WANTED:
        if name not in by_name:
            raise LookupError(f"module {name} not in {moddir}")
        visit(by_name[name])
    return [moddir / m for m in order]


def find_guest_kit() -> GuestKit | str:
    """What a guest boot needs, or why it cannot run here (a skip reason)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return "no qemu-system-x86_64 (Debian: qemu-system-x86)"
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        return "no busybox (Debian: busybox-static)"
    with busybox.open("rb") as f:
        if b"ld-linux" in f.read(8192):  # an ELF interpreter: dynamically linked
            return "/bin/busybox is dynamically linked (Debian: busybox-static)"
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    for kernel in reversed(kernels):
        version = kernel.name.removeprefix("vmlinuz-")
        moddir = Path("/lib/modules") / version
        if not os.access(kernel, os.R_OK) or not (moddir / "modules.dep").exists():
            continue
        try:
            modules = _module_order(moddir)
        except LookupError:
            continue
        if any(m.suffix not in _DECOMPRESS for m in modules):
            continue  # zstd-compressed modules: no decompressor in the standard library
        return GuestKit(qemu, kernel, modules, busybox)
    return (
        "no readable kernel with uncompressed, xz or gzip virtio modules in /boot "
        "(Debian: linux-image-amd64)"
    )


def _module_name(path: Path) -> str:
    """``virtio_blk.ko`` whatever the compression of ``path``."""
    return path.name.split(".ko")[0] + ".ko"


def _module_bytes(path: Path) -> bytes:
    """The module's ELF bytes (busybox insmod does not decompress)."""
    return _DECOMPRESS[path.suffix](path.read_bytes())


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 0) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    out = head + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def build_initramfs(kit: GuestKit, dest: Path, functions: str) -> None:
    """A newc initramfs: busybox, the modules, ``/checks.sh`` (``functions``), ``/init``."""
    load = "\n".join(f"insmod /lib/modules/{_module_name(m)}" for m in kit.modules)
    init = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
{load}
export ENV=/checks.sh
echo "GUEST-""UP"
exec sh
"""
    entries = [
        _cpio_entry(d, 0o040755, ino=i + 1)
        for i, d in enumerate(("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"))
    ]
    ino = 100
    files = [("bin/busybox", 0o100755, kit.busybox.read_bytes())]
    files += [(f"lib/modules/{_module_name(m)}", 0o100644, _module_bytes(m)) for m in kit.modules]
    files += [("checks.sh", 0o100644, functions.encode()), ("init", 0o100755, init.encode())]
    for name, mode, data in files:
        ino += 1
        entries.append(_cpio_entry(name, mode, data, ino))
    entries.append(_cpio_entry("TRAILER!!!", 0))
    dest.write_bytes(b"".join(entries))


class Guest:
    """QEMU running a guest whose console is QEMU's stdio."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._buf = bytearray()
        self._pos = 0  # what wait_for has consumed
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._seq = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):
            self._log.write(chunk)
            self._log.flush()
            with self._cond:
                self._buf += chunk
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the console shows ``pattern`` after what was consumed; consume it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._buf[self._pos :].decode(errors="replace")
                m = rx.search(text)
                if m is not None:
                    self._pos += len(text[: m.end()].encode(errors="replace"))
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = text[-3000:]
                    rc = self.proc.poll()
                    state = "running" if rc is None else f"exited {rc}"
                    raise TimeoutError(
                        f"guest console: no {pattern!r} after {timeout:.0f} s (qemu {state}); "
                        f"console tail:\n{tail}"
                    )
                self._cond.wait(min(left, 1.0))

    def run(self, command: str, timeout: float = 60.0) -> str:
        """Type ``command``, wait for it to finish; its output. Fails on a non-zero status."""
        self._seq += 1
        tag = f"{self._seq:04d}"
        # The echoed command line shows '@OUT""-0001@'; only the real output joins
        # the quotes, so the markers match the output and never the echo.
        line = f'echo "@OUT""-{tag}@"; {command}; echo "@RC""-{tag}=$?@"\n'
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()
        m = self.wait_for(rf"(?s)@OUT-{tag}@\r?\n(.*?)@RC-{tag}=(\d+)@", timeout)
        out = m.group(1).replace("\r", "")
        if m.group(2) != "0":
            raise AssertionError(f"guest command {command!r} exited {m.group(2)}:\n{out}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self._log.close()
