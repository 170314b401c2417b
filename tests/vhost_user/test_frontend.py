"""A card's virtio-blk device served by qemu-storage-daemon through the daemon's
vhost-user front-end (``backend = "vhost-user"``), end to end with real processes:
``mic-host``, ``mic-card`` and ``qemu-storage-daemon``.

The card's own driver talks to qemu-storage-daemon's rings; every check reads
the image on the host. Skips, saying why, without ``qemu-storage-daemon``
(Debian ``qemu-system-common``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mic_host
from mic_host.client import Client
from mic_host.config import validate_device_options
from tests.block import storm
from tests.integration.helpers import micctl
from virtio.errors import ConfigError, MicError

QSD = shutil.which("qemu-storage-daemon")
needs_qsd = pytest.mark.skipif(
    QSD is None, reason="needs qemu-storage-daemon (Debian qemu-system-common; .ci/run)"
)
APPS = "tests.vhost_user.frontend_apps"
BLOCK_APPS = "tests.block.apps"
SECTOR = 512


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Qsd:
    """qemu-storage-daemon exporting ``images`` (name -> file) as vhost-user-blk on
    ``<dir>/<name>.sock``; started with ``--daemonize``, so the sockets listen
    once :meth:`start` returns."""

    def __init__(self, d: Path, images: dict[str, Path]) -> None:
        self.dir = d
        self.images = images
        self.pid: int | None = None

    def sock(self, name: str) -> Path:
        return self.dir / f"{name}.sock"

    def start(self) -> None:
        assert QSD is not None
        args: list[str] = [QSD, "--daemonize", "--pidfile", str(self.dir / "qsd.pid")]
        for name, image in self.images.items():
            args += [
                "--blockdev",
                f"driver=file,filename={image},node-name={name}",
                "--export",
                f"type=vhost-user-blk,id=e{name},node-name={name},"
                f"addr.type=unix,addr.path={self.sock(name)},writable=on",
            ]
        subprocess.run(args, check=True, timeout=60)
        self.pid = int((self.dir / "qsd.pid").read_text())

    def kill(self, sig: int = signal.SIGKILL) -> None:
        pid, self.pid = self.pid, None
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while _alive(pid):
            assert time.monotonic() < deadline, f"qemu-storage-daemon {pid} did not exit"
            time.sleep(0.02)
        for name in self.images:
            self.sock(name).unlink(missing_ok=True)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short state directory (socket paths); its logs' tails are printed at the end
    (pytest shows them for a failed test)."""
    path = Path(tempfile.mkdtemp(prefix="vuf", dir="/tmp"))
    try:
        yield path
    finally:
        for log in sorted(path.glob("*.log")):
            print(
                f"--- {log.name} (tail) ---",
                *log.read_text(errors="replace")[-4000:].splitlines(),
                sep="\n",
            )
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qsd(state_dir: Path) -> Iterator[Qsd]:
    data, journal = state_dir / "data.img", state_dir / "journal.img"
    data.write_bytes(os.urandom(8 << 20))
    journal.write_bytes(bytes(64 << 10))
    q = Qsd(state_dir, {"data": data, "journal": journal})
    q.start()
    try:
        yield q
    finally:
        q.kill(signal.SIGTERM)


def _config(q: Qsd, used_ring_in_card: bool = True) -> str:
    return f"""
[[cards]]
name = "mic0"
boot_at_start = true
used_ring_in_card = {str(used_ring_in_card).lower()}

[[cards.devices]]
type = "console"

[[cards.devices]]
type = "block"
name = "data"
options = {{ backend = "vhost-user", socket = "{q.sock("data")}" }}

[[cards.devices]]
type = "block"
name = "journal"
options = {{ backend = "vhost-user", socket = "{q.sock("journal")}" }}
"""


NEIGHBOUR = """
[[cards]]
name = "mic1"
boot_at_start = true

[[cards.devices]]
type = "console"

[[cards.devices]]
type = "block"
options = { image = "{state_dir}/mic1.img", size = "1M", create = true }
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _device(client: Client, name: str) -> dict[str, Any]:
    stats = await client.card("mic0").stats()
    return next(d for d in stats["devices"] if d["name"] == name)


async def _card_state(client: Client, device: str) -> str:
    devs = await client.card("mic0").devices()
    return str(next(d for d in devs if d["device"] == device)["state"])


@needs_qsd
@pytest.mark.asyncio
# the used rings in card RAM (the MIC trick) or in host RAM: two regions of the table
@pytest.mark.parametrize("used_ring_in_card", [True, False])
async def test_card_dd_sha256sum_and_flush_storm_land_in_the_image(
    state_dir: Path, qsd: Qsd, used_ring_in_card: bool
) -> None:
    data = qsd.images["data"]
    async with mic_host.launch(state_dir, _config(qsd, used_ring_in_card)) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=60)
        info = (await card.run(f"{APPS}:info", "vda"))["value"]
        assert info["capacity"] == data.stat().st_size // SECTOR
        assert info["seg_max"] == 126  # qemu-storage-daemon's, for a 128-entry ring

        # the card's shell, through micctl: what it reads is the image's bytes
        done = await micctl(state_dir, "exec", "mic0", "--", "sha256sum", "/dev/vda", timeout=60)
        assert done.rc == 0, done.err
        assert done.out.split()[0] == _sha(data)
        done = await micctl(
            state_dir,
            "exec",
            "mic0",
            "--",
            "dd",
            "if=/dev/vda",
            "of=/dev/vda",
            "bs=4096",
            "count=4",
            "seek=1000",
            "conv=fsync,notrunc",
            timeout=60,
        )
        assert done.rc == 0, done.err
        raw = data.read_bytes()
        assert raw[1000 * 4096 : 1004 * 4096] == raw[: 4 * 4096]

        # WRITE_ZEROES reaches the image too (and gives the storm a clean disk)
        await card.run(f"{APPS}:zero", "vda", timeout=120)
        assert data.read_bytes() == bytes(data.stat().st_size)

        # a write + flush storm at depth 16: every write the journal says a
        # completed FLUSH covered is in the image, and the storm ran to its end
        seed, limit = 5, 3000
        r = await card.run(
            f"{BLOCK_APPS}:write_storm",
            "vda",
            "vdb",
            seed,
            16,
            limit,
            str(state_dir / "storm.txt"),
            timeout=300,
        )
        assert r["value"]["prefix"] == limit
        epoch, prefix = storm.read_journal(qsd.images["journal"].read_bytes()[:SECTOR], seed)
        assert epoch > 0
        assert prefix > 0
        verdict = storm.check_image(data.read_bytes(), seed, limit)
        assert verdict.problems == [], verdict
        assert verdict.checked_sectors > 0

        # the data went card <-> qemu-storage-daemon: the daemon only relayed doorbells
        dev = await _device(client, "data")
        assert dev["backend"]["connected"] is True
        assert dev["backend"]["kicks"] > 0
        assert dev["backend"]["interrupts"] > 0
        assert [q["chains"] for q in dev["queues"]] == [0]


@needs_qsd
@pytest.mark.asyncio
async def test_back_end_killed_mid_storm_breaks_only_that_device(state_dir: Path, qsd: Qsd) -> None:
    data, seed = qsd.images["data"], 9
    async with mic_host.launch(state_dir, _config(qsd) + NEIGHBOUR) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=60)
        await client.card("mic1").wait("online", timeout=60)
        await card.run(f"{APPS}:zero", "vda", timeout=120)
        task = asyncio.ensure_future(
            card.run(
                f"{BLOCK_APPS}:write_storm",
                "vda",
                "vdb",
                seed,
                16,
                10**9,
                str(state_dir / "storm.txt"),
            )
        )
        journal = qsd.images["journal"]
        deadline = time.monotonic() + 120
        while storm.read_journal(journal.read_bytes()[:SECTOR], seed)[1] < 500:
            assert not task.done(), task.result()
            assert time.monotonic() < deadline, "storm made no progress"
            await asyncio.sleep(0.05)
        qsd.kill()
        with pytest.raises(MicError):
            await asyncio.wait_for(task, 60)

        # the card sees a broken device; the daemon, the card and its console carry on
        deadline = time.monotonic() + 30
        while await _card_state(client, "vda") != "needs_reset":
            assert time.monotonic() < deadline, await card.devices()
            await asyncio.sleep(0.05)
        assert await card.state() == "online"
        out = await card.exec("echo", "still here")
        assert out.stdout == b"still here\n"
        # ... and so does another card, whose disk MIC-VOP serves
        mic1 = client.card("mic1")
        out = await mic1.exec("sha256sum", "/dev/vda")
        assert out.stdout.split()[0].decode() == _sha(state_dir / "mic1.img")
        dev = await _device(client, "data")
        assert "vhost-user back-end lost" in dev["last_error"]
        # every write acknowledged before the last completed FLUSH is in the image
        _, prefix = storm.read_journal(journal.read_bytes()[:SECTOR], seed)
        assert prefix >= 500
        verdict = storm.check_image(data.read_bytes(), seed, prefix)
        assert verdict.problems == [], verdict

        # a restarted back-end serves the card again once it resets the device
        qsd.start()
        got = await card.run(f"{APPS}:rebind_and_hash", "vda", timeout=120)
        assert got["value"] == _sha(data)
        dev = await _device(client, "data")
        assert dev["backend"]["reconnects"] == 1


CONSOLE_ONLY = """
[[cards]]
name = "mic0"
boot_at_start = true

[[cards.devices]]
type = "console"
"""


@needs_qsd
@pytest.mark.asyncio
async def test_micctl_attach_reboot_detach_and_a_dead_socket(state_dir: Path, qsd: Qsd) -> None:
    data = qsd.images["data"]
    async with mic_host.launch(state_dir, CONSOLE_ONLY) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=60)
        sock = str(qsd.sock("data"))
        done = await micctl(
            state_dir, "attach", "mic0", "block", "--backend", "vhost-user", "--socket", sock
        )
        assert done.rc == 0, done.err
        assert done.out.strip() == "vda"
        assert (await card.run(f"{APPS}:read_hash", "vda", timeout=120))["value"] == _sha(data)

        # a reboot connects again: the card's fresh driver reads the same disk
        done = await micctl(state_dir, "reboot", "mic0", "--wait", timeout=120)
        assert done.rc == 0, done.err
        await card.wait("online", timeout=60)
        assert (await card.run(f"{APPS}:read_hash", "vda", timeout=120))["value"] == _sha(data)

        done = await micctl(state_dir, "detach", "mic0", "block1")
        assert done.rc == 0, done.err

        # nobody listening: a clear refusal naming the socket; nothing is attached
        dead = state_dir / "nobody.sock"
        done = await micctl(
            state_dir, "attach", "mic0", "block", "--backend", "vhost-user", "--socket", str(dead)
        )
        assert done.rc != 0
        assert str(dead) in done.err
        assert "cannot connect" in done.err
        assert [d["device"] for d in await card.devices()] == ["hvc0"]
        assert (await card.exec("echo", "ok")).stdout == b"ok\n"


def test_config_checks_the_vhost_user_options(tmp_path: Path) -> None:
    def check(**opts: object) -> dict[str, Any]:
        return validate_device_options("block", opts, state_dir=tmp_path, card="mic0")

    ok = check(backend="vhost-user", socket="vu.sock")
    assert ok["socket"] == str(tmp_path / "vu.sock")
    with pytest.raises(ConfigError, match="needs the socket"):
        check(backend="vhost-user")
    with pytest.raises(ConfigError, match=r"options\.image: not an option of a vhost-user disk"):
        check(backend="vhost-user", socket="s", image="x.img")
    with pytest.raises(ConfigError, match="only a backend"):
        check(image="x.img", socket="s")
    with pytest.raises(ConfigError, match=r"options\.image: required"):
        check(size="1M")
    with pytest.raises(ConfigError, match="longer than a Unix socket path may be"):
        check(backend="vhost-user", socket="/tmp/" + "x" * 120)
    with pytest.raises(ConfigError, match='expected "file" or "vhost-user"'):
        check(backend="nbd", socket="s")
    with pytest.raises(ConfigError, match=r"options\.ring: a vhost-user disk gets split rings"):
        check(backend="vhost-user", socket="s", ring="packed")
    assert check(backend="vhost-user", socket="s", ring="split")["ring"] == "split"


@needs_qsd
@pytest.mark.asyncio
async def test_a_card_driver_that_breaks_the_ring_breaks_only_its_device(
    state_dir: Path, qsd: Qsd
) -> None:
    async with mic_host.launch(state_dir, _config(qsd)) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=60)
        # a claimed vda gets a read into memory the card does not have:
        # qemu-storage-daemon drops that connection, the device goes NEEDS_RESET
        got = (await card.run(f"{APPS}:bad_buffer", "vda", timeout=120))["value"]
        assert got.startswith("BrokenResourceError"), got
        assert "needs reset" in got, got
        dev = await _device(client, "data")
        assert "vhost-user back-end lost" in dev["last_error"]
        # the other disk of the same qemu-storage-daemon, the card and the daemon carry on
        h = await card.run(f"{APPS}:read_hash", "vdb", timeout=120)
        assert h["value"] == _sha(qsd.images["journal"])
        assert qsd.pid is not None
        assert _alive(qsd.pid)
        # the claim's end reset the device: it reconnected and serves the card again
        h = await card.run(f"{APPS}:read_hash", "vda", timeout=120)
        assert h["value"] == _sha(qsd.images["data"])
        assert (await _device(client, "data"))["backend"]["reconnects"] == 1


async def _fake_back_end(path: Path, behaviour: str) -> asyncio.Server:
    """A back-end that answers GET_FEATURES wrongly (``behaviour``): "legacy" offers
    no VERSION_1, "garbage" sends bytes that are no reply, "hangup" closes."""
    import struct

    hdr = struct.Struct("=III")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request, _flags, size = hdr.unpack(await reader.readexactly(hdr.size))
                await reader.readexactly(size)
                if request == 15:  # GET_PROTOCOL_FEATURES: CONFIG only (no acks)
                    writer.write(hdr.pack(15, 0x5, 8) + struct.pack("=Q", 1 << 9))
                elif request != 1:  # GET_FEATURES is answered below; the rest is not
                    continue
                elif behaviour == "legacy":  # no VERSION_1, otherwise plausible
                    writer.write(hdr.pack(1, 0x5, 8) + struct.pack("=Q", 0x7 << 28))
                elif behaviour == "garbage":
                    writer.write(b"\xff" * 20)
                elif behaviour == "hangup":
                    writer.close()
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(serve, path=str(path))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ("legacy", "does not offer VERSION_1"),
        ("garbage", "protocol version"),
        ("hangup", "closed the connection"),
    ],
)
async def test_a_bad_back_end_is_refused_with_a_clear_error(
    state_dir: Path, behaviour: str, message: str
) -> None:
    sock = state_dir / "fake.sock"
    server = await _fake_back_end(sock, behaviour)
    try:
        async with mic_host.launch(state_dir, CONSOLE_ONLY) as client:
            card = client.card("mic0")
            await card.wait("online", timeout=60)
            done = await micctl(
                state_dir, "attach", "mic0", "block", "--backend=vhost-user", f"--socket={sock}"
            )
            assert done.rc == 1, done
            assert str(sock) in done.err
            assert message in done.err, done.err
            assert [d["device"] for d in await card.devices()] == ["hvc0"]
            assert (await card.exec("echo", "ok")).stdout == b"ok\n"
    finally:
        server.close()
        await server.wait_closed()


@needs_qsd
@pytest.mark.asyncio
async def test_card_killed_mid_storm_then_booted_again(state_dir: Path, qsd: Qsd) -> None:
    data, journal, seed = qsd.images["data"], qsd.images["journal"], 13
    async with mic_host.launch(state_dir, _config(qsd)) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=60)
        await card.run(f"{APPS}:zero", "vda", timeout=120)
        task = asyncio.ensure_future(
            card.run(
                f"{BLOCK_APPS}:write_storm", "vda", "vdb", seed, 16, 10**9, str(state_dir / "s")
            )
        )
        deadline = time.monotonic() + 120
        while storm.read_journal(journal.read_bytes()[:SECTOR], seed)[1] < 500:
            assert not task.done(), task.result()
            assert time.monotonic() < deadline, "storm made no progress"
            await asyncio.sleep(0.05)
        os.kill((await card.status())["pid"], signal.SIGKILL)
        with pytest.raises(MicError):
            await asyncio.wait_for(task, 60)
        await card.wait("crashed", timeout=60)
        # the rings were taken back (every request qemu-storage-daemon had taken
        # completed) before the card's memory went: the image holds what was flushed
        _, prefix = storm.read_journal(journal.read_bytes()[:SECTOR], seed)
        verdict = storm.check_image(data.read_bytes(), seed, prefix)
        assert verdict.problems == [], verdict
        # a new boot connects again and reads the same disk
        await card.boot(wait=True, timeout=60)
        got = await card.run(f"{BLOCK_APPS}:digest", "vda", timeout=120)
        assert got["value"] == _sha(data)
        dev = await _device(client, "data")
        assert dev["backend"]["connected"] is True
        assert dev["errors"] == 0
