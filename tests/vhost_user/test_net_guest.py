"""A Linux guest's virtio-net NICs are MIC-VOP's net backend: real QEMU, real driver, real cards.

One guest boot (QEMU TCG, ``-smp 2``) with two ``virtio-net-pci`` NICs on
``-netdev vhost-user``:

- NIC ``tap``: ``mic-vhost-user net --tap`` in its own process; the host side
  of the TAP has an address. The guest pings the host, the host pings the
  guest, and TCP both ways (a 4 MiB download, which the host's TSO sends as
  large GSO frames, and a 1.4 MiB upload) is checked by hash on both ends.
- NIC ``switch``: a ``mic-host`` daemon with card mic0 on switch ``swN`` (the
  card's TAP in its own namespace), exported with ``micctl vhost-user export``;
  the guest pings the card across the daemon's switch, which learns the
  guest's MAC. Garbage on a second export of the same switch drops only that
  connection: the card and the guest's NIC carry on.

Reloading the guest's virtio_net stops and restarts every ring (with RX
buffers held by the backends), after which both NICs work again. Neither
back-end logs an error. Skips (with the reason) without QEMU, a kernel or a
static busybox, or without the privilege for TAP devices and namespaces.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.vhost_user.guest import Guest, build_initramfs, find_guest_kit
from transport.tap import ip_sync, netns_exists, tap_privilege_problem

KIT = find_guest_kit()
PROBLEM = tap_privilege_problem()
pytestmark = [
    pytest.mark.skipif(isinstance(KIT, str), reason=str(KIT)),
    pytest.mark.skipif(PROBLEM is not None, reason=f"TAP/netns unavailable: {PROBLEM}"),
    pytest.mark.timeout(300),
]

TAP_MAC = "52:54:00:00:aa:01"
SW_MAC = "52:54:00:00:aa:02"
#: a /24 for the TAP's link, varied per run so that parallel runs do not clash
SUBNET = f"10.213.{20 + os.getpid() % 200}"
HOST_IP, GUEST_IP = f"{SUBNET}.1", f"{SUBNET}.2"
CARD_IP = "172.31.255.1"  # mic0 (node 1) on a switch, the daemon's default
GUEST_SW_IP = "172.31.255.100"
BLOB = os.urandom(4 << 20)

#: Shell functions the guest's interactive shell reads ($ENV).
CHECKS = r"""
set -o pipefail
h() { sha256sum | cut -d' ' -f1; }
# ifc MAC: the interface with that address
ifc() { for i in /sys/class/net/*; do [ "$(cat $i/address)" = "$1" ] && echo ${i##*/}; done; }
# up MAC ADDR/LEN: configure the NIC with that MAC
up() { d=$(ifc $1); [ -n "$d" ] && ip link set $d up && ip addr replace $2 dev $d; }
"""


def _mic(*argv: str, state_dir: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mic_host.micctl", "--state-dir", str(state_dir), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _until(check: Callable[[], object], what: str, timeout: float, proc: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.1)


class _Http(http.server.BaseHTTPRequestHandler):
    """GET: the blob; POST: the body's hash is kept (``server.uploads``)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BLOB)))
        self.end_headers()
        self.wfile.write(BLOB)

    def do_POST(self) -> None:
        n = int(self.headers["Content-Length"])
        body = self.rfile.read(n)
        self.server.uploads.append(hashlib.sha256(body).hexdigest())  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@dataclass
class Booted:
    guest: Guest
    state_dir: Path
    export: Path
    vhost_log: Path
    vhost: subprocess.Popen[bytes]
    daemon: subprocess.Popen[bytes]
    http: http.server.ThreadingHTTPServer
    logs: list[Path] = field(default_factory=list)

    def micctl(self, *argv: str) -> Any:
        r = _mic(*argv, "--json", state_dir=self.state_dir)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def configure(self) -> None:
        self.guest.run(f"up {TAP_MAC} {GUEST_IP}/24 && up {SW_MAC} {GUEST_SW_IP}/24")

    def wait_card_link(self) -> None:
        def ready() -> bool:
            (d,) = self.micctl("net", "mic0")["devices"]
            card = d.get("card") or {}
            return bool(card.get("mode") == "tap" and card.get("link") == "up")

        _until(ready, "the card's TAP is up", 60, self.daemon)


def _popen(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=f)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    assert not isinstance(KIT, str)
    uid = uuid.uuid4().hex[:6]
    d = tmp_path_factory.mktemp("vu-net")
    state_dir = d / "state"
    tap, switch, card_ns = f"vun{uid}", f"sw{uid}", f"mvc-{uid}"
    exe = shutil.which("mic-vhost-user", path=str(Path(sys.executable).parent)) or "mic-vhost-user"
    vhost_log = d / "mic-vhost-user.log"
    tap_sock = d / "tap.sock"
    argv = [exe, "net", "--socket", str(tap_sock), "--tap", tap, "--host-ip", f"{HOST_IP}/24"]
    cfg = d / "mic-host.toml"
    cfg.write_text(
        'version = 1\n\n[[cards]]\nname = "mic0"\ncard_ram = "32M"\nhost_ram = "4M"\n'
        "heartbeat_interval = 0.25\nheartbeat_timeout = 5.0\n"
        '[[cards.devices]]\ntype = "console"\n'
        '[[cards.devices]]\ntype = "net"\nname = "net0"\n'
        f'options = {{ backend = "switch", switch = "{switch}", card_netns = "{card_ns}" }}\n'
    )
    procs: list[subprocess.Popen[bytes]] = []
    httpd: http.server.ThreadingHTTPServer | None = None
    guest: Guest | None = None
    try:
        vhost = _popen(argv, vhost_log)
        procs.append(vhost)
        daemon = _popen(
            [sys.executable, "-m", "mic_host.daemon", "--state-dir", str(state_dir), "--config",
             str(cfg)],
            d / "mic-host.stderr",
        )  # fmt: skip
        procs.append(daemon)
        _until(lambda: b"ready:" in vhost_log.read_bytes(), "mic-vhost-user ready", 60, vhost)
        httpd = http.server.ThreadingHTTPServer((HOST_IP, 0), _Http)
        httpd.uploads = []  # type: ignore[attr-defined]
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        _until(
            lambda: _mic("status", state_dir=state_dir, timeout=10).returncode == 0,
            "mic-host answers",
            60,
            daemon,
        )
        r = _mic("boot", "mic0", "--wait", "--timeout", "60", state_dir=state_dir, timeout=90)
        assert r.returncode == 0, r.stderr
        export = d / "sw.sock"
        r = _mic("vhost-user", "export", "--switch", switch, "--socket", str(export),
                 state_dir=state_dir)  # fmt: skip
        assert r.returncode == 0, r.stderr
        initrd = d / "initrd.cpio"
        build_initramfs(KIT, initrd, CHECKS)
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
            "-chardev", f"socket,id=vt,path={tap_sock}",
            "-netdev", "vhost-user,id=nt,chardev=vt",
            # vectors=0: QEMU 7.2 under TCG crashes in vhost_net_start unmasking
            # MSI-X vectors of a vhost-user NIC (docs/vhost-user.md)
            "-device", f"virtio-net-pci,netdev=nt,mac={TAP_MAC},vectors=0,addr=0x4",
            "-chardev", f"socket,id=vs,path={export}",
            "-netdev", "vhost-user,id=ns,chardev=vs",
            "-device", f"virtio-net-pci,netdev=ns,mac={SW_MAC},vectors=0,addr=0x5",
        ]  # fmt: skip
        guest = Guest(argv, d / "console.log")
        b = Booted(guest, state_dir, export, vhost_log, vhost, daemon, httpd)
        b.logs = [vhost_log, state_dir / "mic-host.log", d / "console.log"]
        guest.wait_for("GUEST-UP", 120)
        b.configure()
        b.wait_card_link()
        yield b
    finally:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if guest is not None:
            guest.close()
        for p in procs:
            _stop(p)
        assert not netns_exists(card_ns), "the card's namespace outlived the daemon"
        with_tap = [ln for ln in ip_sync("-o", "link", "show").splitlines() if f" {tap}:" in ln]
        assert not with_tap, f"TAP {tap} outlived mic-vhost-user"


def test_guest_pings_the_host_through_the_tap(booted: Booted) -> None:
    out = booted.guest.run(f"ping -c 3 -W 10 {HOST_IP}", 90)
    assert "3 packets received" in out, out
    out = booted.guest.run(f"ping -c 2 -s 1400 -W 10 {HOST_IP}", 90)
    assert "2 packets received" in out, out


def test_host_pings_the_guest(booted: Booted) -> None:
    r = subprocess.run(
        ["ping", "-c", "2", "-W", "10", GUEST_IP], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_tcp_both_ways(booted: Booted) -> None:
    port = booted.http.server_address[1]
    got = booted.guest.run(f"wget -q -O - http://{HOST_IP}:{port}/blob | h", 120).strip()
    assert got == hashlib.sha256(BLOB).hexdigest()
    sent = booted.guest.run(
        # busybox wget posts a file as a string (up to a NUL byte): base64 text
        "dd if=/dev/urandom bs=64k count=16 2>/dev/null | base64 >/tmp/up && h </tmp/up && "
        f"wget -q -O /dev/null --post-file=/tmp/up http://{HOST_IP}:{port}/up",
        120,
    ).strip()
    assert booted.http.uploads == [sent]  # type: ignore[attr-defined]


def test_guest_pings_a_card_across_the_daemons_switch(booted: Booted) -> None:
    out = booted.guest.run(f"ping -c 3 -W 10 {CARD_IP}", 90)
    assert "3 packets received" in out, out
    (nic,) = booted.micctl("net", "mic0")["devices"]
    port = nic["switch"]["macs"].get(SW_MAC)
    assert port == f"vhost-user/{booted.export}", nic["switch"]
    (ex,) = booted.micctl("vhost-user", "list")
    assert ex["connected"]
    assert ex["switch"] == nic["switch"]["name"]
    assert ex["counters"]["tx_packets"] >= 3
    assert ex["counters"]["rx_packets"] >= 3


def test_garbage_on_another_export_drops_only_that_connection(booted: Booted) -> None:
    switch = booted.micctl("vhost-user", "list")[0]["switch"]
    other = booted.export.with_name("other.sock")
    booted.micctl("vhost-user", "export", "--switch", switch, "--socket", str(other))
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(other))
        s.sendall(b"\xde\xad\xbe\xef" * 8)
        s.settimeout(30)
        try:
            got = s.recv(1)
        except ConnectionResetError:  # closed with our garbage unread
            got = b""
        assert got == b""  # dropped
    log = booted.state_dir / "mic-host.log"
    _until(lambda: "vhost-user connection dropped" in log.read_text(), "the drop logged", 30)
    rows = booted.micctl("vhost-user", "list")
    assert {r["socket"]: r["dropped"] for r in rows} == {str(booted.export): 0, str(other): 1}
    r = _mic("vhost-user", "unexport", "--socket", str(other), state_dir=booted.state_dir)
    assert r.returncode == 0, r.stderr
    assert not other.exists()
    out = booted.guest.run(f"ping -c 2 -W 10 {CARD_IP}", 90)
    assert "2 packets received" in out, out
    assert booted.micctl("status", "mic0")["cards"][0]["state"] == "online"


def test_driver_reload_restarts_both_nics(booted: Booted) -> None:
    # every ring stops (GET_VRING_BASE, with RX buffers held) and starts again
    booted.guest.run(
        "rmmod virtio_net && insmod /lib/modules/virtio_net.ko && "
        f'while [ -z "$(ifc {SW_MAC})" ] || [ -z "$(ifc {TAP_MAC})" ]; do sleep 0.1; done',
        90,
    )
    booted.configure()
    out = booted.guest.run(f"ping -c 2 -W 10 {HOST_IP} && ping -c 2 -W 10 {CARD_IP}", 120)
    assert out.count("2 packets received") == 2, out


def test_backends_logged_no_error(booted: Booted) -> None:
    assert booted.vhost.poll() is None
    assert booted.daemon.poll() is None
    text = booted.vhost_log.read_text()
    assert not re.search(r"ERROR|WARNING", text), text
    daemon_log = (booted.state_dir / "mic-host.log").read_text()
    errors = [
        ln
        for ln in daemon_log.splitlines()
        if "ERROR" in ln and "vhost-user connection dropped" not in ln
    ]
    assert not errors, daemon_log[-4000:]
