"""What ``micctl``, ``mic-host`` and the card shell say (issue 15 item 5), through real
processes: each message the issue lists, as a user meets it.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

from tests.integration.helpers import (
    REPO,
    booted,
    card_toml,
    config,
    daemon,
    mic_host_cmd,
    micctl,
)


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("micctl: "), lines[0]
    return lines[0]


@pytest.mark.asyncio
async def test_attach_to_a_card_that_is_down(state_dir: Path) -> None:
    """Refused with the reason (not ``None`` and 0), nothing made; ``--next-boot`` keeps it."""
    async with daemon(state_dir) as client:
        image = state_dir / "later.img"
        args = ["attach", "mic0", "block", "--image", str(image), "--size", "1M", "--create"]
        r = await micctl(state_dir, *args)
        assert r.rc == 1, r
        assert "mic0 is ready, not running: nothing attached" in _one_error_line(r.err)
        assert "--next-boot" in r.err
        assert not image.exists()
        assert [d["name"] for d in (await client.card("mic0").status())["devices"]] == [
            "console0",
            "disk",
        ]
        r = await micctl(state_dir, *args, "--next-boot")
        assert (r.rc, r.out, r.err) == (0, "block2: added for mic0's next boot\n", ""), r
        card = await booted(client)
        assert [d["device"] for d in (await card.status())["devices"]] == ["hvc0", "vda", "vdb"]


@pytest.mark.asyncio
async def test_attach_errors_name_what_the_user_chose(state_dir: Path) -> None:
    empty = state_dir / "empty.img"
    empty.touch()
    async with daemon(state_dir) as client:
        await booted(client)
        # a missing --copy-from source is the source's problem, not the target's
        missing = state_dir / "nope.img"
        target = state_dir / "copy.img"
        attach = ["attach", "mic0", "block", "--image"]
        r = await micctl(state_dir, *attach, str(target), "--copy-from", str(missing))
        assert r.rc == 1, r
        assert _one_error_line(r.err) == (
            f"micctl: --copy-from {missing}: No such file or directory"
        )
        assert not target.exists()
        # a missing image: the path, never an internal label such as "block2"
        gone = state_dir / "gone.img"
        r = await micctl(state_dir, "attach", "mic0", "block", "--image", str(gone))
        assert r.rc == 1
        line = _one_error_line(r.err)
        assert f"cannot open {gone}: No such file or directory" in line
        assert not re.search(r"block ?\d", line), line
        # a label the user chose is named as such
        r = await micctl(
            state_dir, "attach", "mic0", "block", "--image", str(gone), "--opt", "name=scratch"
        )
        assert f"block 'scratch': cannot open {gone}" in _one_error_line(r.err)
        # any backend: "net net2: ..." would name a label the daemon made up
        nic = ["attach", "mic0", "net", "--opt", "backend=switch"]
        r = await micctl(state_dir, *nic, "--opt", "mac=01:00:5e:00:00:01")
        assert r.rc == 1, r
        line = _one_error_line(r.err)
        assert "net device: MAC 01:00:5e:00:00:01 is not a unicast address" in line
        assert "net2" not in line
        # what makes no disk is refused with the reason, whatever the path
        for path, why in (
            (str(empty), "is empty: an image must hold at least one 512-byte block"),
            ("/dev/null", "/dev/null is a character device"),
            ("/dev/zero", "/dev/zero is a character device"),
        ):
            r = await micctl(state_dir, "attach", "mic0", "block", "--image", path)
            assert r.rc == 1, (path, r)
            assert why in _one_error_line(r.err)


@pytest.mark.asyncio
async def test_mic_host_bad_log_level_is_a_usage_error() -> None:
    base = Path(tempfile.mkdtemp(prefix="mic", dir="/tmp"))
    try:
        sd = base / "state"
        r = await mic_host_cmd("--state-dir", str(sd), "--log-level", "bogus")
        assert r.rc == 2, r
        assert r.err == (
            "mic-host: --log-level 'bogus': expected one of debug, info, warning, error, critical\n"
        )
        assert not sd.exists()  # no state directory, no lock file, no log
    finally:
        os.rmdir(base)


@pytest.mark.asyncio
async def test_card_shell_messages(state_dir: Path) -> None:
    """dmesg counts seconds since boot; accel bench takes size suffixes and says its
    prefix once."""
    async with daemon(state_dir) as client:
        await booted(client)
        r = await micctl(state_dir, "exec", "mic0", "--", "dmesg")
        assert r.rc == 0, r
        stamps = [re.match(r"^\[ *(\d+\.\d{6})\] ", line) for line in r.out.splitlines()]
        assert stamps, r.out
        assert all(stamps), r.out
        seconds = [float(m.group(1)) for m in stamps if m]
        assert 0 <= seconds[0] <= seconds[-1] < 120  # since boot, not since 1970
        assert re.match(r"^\[ {4}\d\.\d{6}\] ", r.out)  # Linux's "[    1.234567]"

        bench = ["exec", "mic0", "--timeout", "60", "--", "accel", "bench", "--alg", "zlib"]
        r = await micctl(state_dir, *bench, "--size", "64K", "--seconds", "0.2", "--json")
        assert r.rc == 0, r
        assert r.json()["length"] == 65536
        r = await micctl(state_dir, *bench, "--size", "64X", "--seconds", "0.2")
        assert r.rc == 2, r
        assert r.err.count("accel bench:") == 1, r.err
        assert "bad size '64X'" in r.err


@pytest.mark.asyncio
async def test_status_right_after_a_reboot(state_dir: Path) -> None:
    """The card says it is going down when it starts to: status never shows the old
    pid as online once a reboot was asked for."""
    async with daemon(state_dir) as client:
        card = await booted(client)
        old = (await card.status())["pid"]
        r = await micctl(state_dir, "exec", "mic0", "--", "reboot")
        assert r.rc == 0, r
        r = await micctl(state_dir, "status", "mic0", "--json")
        (st,) = r.json()["cards"]
        assert (st["state"], st["pid"]) != ("online", old), st
        await card.wait("online", timeout=30)
        st = await card.status()
        assert st["pid"] not in (None, old)
        assert (st["boots"], st["shutdown_status"]) == (2, "nop")


@pytest.mark.asyncio
async def test_frames_nic_reports_no_namespace(state_dir: Path) -> None:
    net = (
        '[[cards.devices]]\ntype = "net"\nname = "net0"\n'
        'options = { backend = "switch", switch = "msg0", card_mode = "frames" }\n'
    )
    async with daemon(state_dir, config(card_toml("mic0", disk=None) + net)) as client:
        await booted(client)
        r = await micctl(state_dir, "net", "mic0", "--json")
        (nic,) = r.json()["devices"]
        assert nic["card_netns"] is None
        assert nic["card"]["mode"] == "frames"
        r = await micctl(state_dir, "net", "mic0")
        card_line = next(line for line in r.out.splitlines() if line.startswith("  card:"))
        assert "mode frames  namespace -" in card_line, r.out


@pytest.mark.asyncio
async def test_reset_prints_what_the_docs_say(state_dir: Path) -> None:
    docs = (REPO / "docs" / "cli.md").read_text()
    row = next(line for line in docs.splitlines() if line.startswith("| `reset CARD"))
    async with daemon(state_dir) as client:
        await booted(client)
        r = await micctl(state_dir, "reset", "mic0")
        assert (r.rc, r.out) == (0, "mic0: ready\n"), r
        assert "`mic0: ready`" in row, row


def _pty_run(argv: list[str]) -> tuple[int, str]:
    """Run ``argv`` with stderr on a terminal (the progress bar draws); (status, what it drew)."""
    import pty
    import subprocess

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    proc.wait(timeout=60)
    assert proc.stdout is not None
    proc.stdout.close()
    return proc.returncode, drawn.decode(errors="replace")


@pytest.mark.asyncio
async def test_progress_bars_on_a_terminal(state_dir: Path) -> None:
    """The copy bar's 100% line comes once; an allocation shows no absurd speed."""
    src = state_dir / "src.img"
    src.write_bytes(os.urandom(1 << 20) * 8)
    micctl_argv = [sys.executable, "-m", "mic_host.micctl", "--state-dir", str(state_dir)]
    async with daemon(state_dir) as client:
        await booted(client)
        copy = [*micctl_argv, "attach", "mic0", "block", "--image", "c.img", "--copy-from"]
        rc, drawn = await asyncio.to_thread(_pty_run, [*copy, str(src)])
        assert rc == 0, drawn
        assert drawn.count("100%") == 1, drawn
        pre = [*micctl_argv, "attach", "mic0", "block", "--image", "p.img", "--create"]
        rc, drawn = await asyncio.to_thread(_pty_run, [*pre, "--size", "64M", "--preallocate"])
        assert rc == 0, drawn
        assert drawn.count("100%") == 1, drawn
        assert "allocating p.img" in drawn
        assert "MiB/s" not in drawn, drawn  # an allocation moves no data: no speed
