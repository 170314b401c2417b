"""The console and the agent through real processes: ``mic-host``, ``mic-card``,
``micctl exec``/``console`` (also inside tmux, a real terminal), the pty directly.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from pathlib import Path

import pytest

from mic_host.client import Client
from tests.integration.helpers import (
    REPO,
    alive,
    booted,
    card_toml,
    command,
    config,
    daemon,
    eventually,
    micctl,
)
from virtio.constants import ConsoleFeature

APPS = "tests.console.apps"
PROMPT = b"mic0:~# "
DISK = "{state_dir}/{card}.img"


def _console_dev(status: dict[str, object]) -> dict[str, object]:
    devs = status["devices"]
    assert isinstance(devs, list)
    (dev,) = [d for d in devs if d["type"] == "console"]
    assert isinstance(dev, dict)
    return dev


@pytest.mark.asyncio
async def test_exec_dd_sha256_log_and_bad_input(state_dir: Path) -> None:
    cfg = config(
        card_toml("mic0"),
        # mic1's card OS does not ack VIRTIO_CONSOLE_F_MULTIPORT: port 0 only, no agent
        card_toml("mic1", card_command=["env", "MIC_CARD_CONSOLE_MULTIPORT=0"]),
    )
    async with daemon(state_dir, cfg) as client:
        mic0 = await booted(client, "mic0")
        mic1 = await booted(client, "mic1")

        # status: the pty per console device, and mpssd's log line
        r = await micctl(state_dir, "status", "--json")
        cards = {c["name"]: c for c in r.json()["cards"]}
        pty0 = _console_dev(cards["mic0"])["pty"]
        assert isinstance(pty0, str)
        assert pty0.startswith("/dev/pts/")
        assert f"mic0 console message goes to {pty0}" in (state_dir / "mic-host.log").read_text()
        assert _console_dev(cards["mic0"])["features"] & ConsoleFeature.MULTIPORT  # type: ignore[operator]
        assert not _console_dev(cards["mic1"])["features"] & ConsoleFeature.MULTIPORT  # type: ignore[operator]

        # micctl exec: output, exit status, stderr
        r = await micctl(state_dir, "exec", "mic0", "--", "uname", "-a")
        assert (r.rc, r.err) == (0, ""), r
        assert re.fullmatch(r"MIC-VOP mic0 \S+ #1 SMP k1om\n", r.out), r.out
        r = await micctl(state_dir, "exec", "mic0", "--", "false")
        assert (r.rc, r.out, r.err) == (1, "", ""), r
        r = await micctl(state_dir, "exec", "mic0", "--", "frob", "x")
        assert (r.rc, r.err) == (127, "sh: frob: command not found\n"), r
        r = await micctl(state_dir, "exec", "mic0", "--", "cat", "/nope")
        assert (r.rc, r.err) == (1, "cat: /nope: No such file or directory\n"), r
        r = await micctl(state_dir, "exec", "mic0", "--", "dd", "if=/dev/zero", "bogus=1")
        assert (r.rc, r.err) == (1, "dd: unrecognized operand 'bogus=1'\n"), r
        r = await micctl(state_dir, "exec", "mic0", "--", "exit", "7")
        assert r.rc == 7, r
        r = await micctl(state_dir, "exec", "mic0", "--timeout", "0.5", "--", "sleep", "30")
        assert (r.rc, "timed out after 0.5 s" in r.err) == (124, True), r
        r = await micctl(state_dir, "exec", "mic0")
        assert (r.rc, "exec needs a command" in r.err) == (2, True), r
        r = await micctl(state_dir, "exec", "mic1", "--", "uname")
        assert (r.rc, "VIRTIO_CONSOLE_F_MULTIPORT" in r.err) == (1, True), r

        # dd onto the disk, then hash it on the card: the whole device and the range
        r = await micctl(state_dir, "exec", "mic0", "--", "dd", "if=/dev/urandom",
                         "of=/dev/vda", "bs=4096", "count=16", "conv=fsync")  # fmt: skip
        assert r.rc == 0, r
        lines = r.err.splitlines()
        assert lines[:2] == ["16+0 records in", "16+0 records out"], r.err
        assert re.fullmatch(
            r"65536 bytes \(66 kB, 64 KiB\) copied, [0-9.e-]+ s, [0-9.]+ [kMG]?B/s", lines[2]
        ), lines[2]
        whole = await mic0.exec("sha256sum", "/dev/vda")
        assert (whole.status, whole.stderr) == (0, b"")
        hex_whole, name = whole.text.split("  ")
        assert name == "/dev/vda\n"
        part = await mic0.exec(line="dd if=/dev/vda of=/tmp/head bs=4096 count=16 status=none")
        assert (part.status, part.stderr) == (0, b""), part
        r = await mic0.exec("sha256sum", "/tmp/head")
        hex_part = r.text.split()[0]
        r = await mic0.exec("ls", "-l", "/tmp")
        assert "65536  head" in r.text
        assert (await mic0.exec("rm", "/tmp/head")).status == 0
        r = await mic0.exec("rm", "/dev/vda")
        assert (r.status, r.stderr) == (
            1,
            b"rm: cannot remove '/dev/vda': Operation not permitted\n",
        )

        # binary output survives the trip; the API unpacks like a tuple
        out, err, status = await mic0.exec("dd", "if=/dev/vda", "bs=512", "count=2", "status=none")
        assert (len(out), err, status) == (1024, b"", 0)

        # garbage on the control queue and on the agent port, from the card
        await mic0.run(f"{APPS}:control_garbage")
        await mic0.run(f"{APPS}:agent_garbage")
        assert (await mic0.exec("echo", "still", "fine")).text == "still fine\n"
        hostlog = (state_dir / "mic-host.log").read_text()
        assert "rejected control message from the card" in hostlog
        assert "agent: rejected a line from the card" in hostlog

        # an agent that never answers: a clear timeout, the card stays online
        await mic0.run(f"{APPS}:hang_agent")
        r = await micctl(state_dir, "exec", "mic0", "--timeout", "0.5", "--", "uname")
        assert (r.rc, "did not answer exec" in r.err) == (1, True), r
        assert (await mic0.status())["state"] == "online"

        # the console log has everything the card wrote on hvc0
        log = (state_dir / "mic0-console.log").read_bytes()
        assert b"MIC-VOP" in log
        assert PROMPT in log

        await mic1.shutdown(wait=True)
        await mic0.shutdown(wait=True)
    image = (state_dir / "mic0.img").read_bytes()
    assert hashlib.sha256(image).hexdigest() == hex_whole
    assert hashlib.sha256(image[:65536]).hexdigest() == hex_part


@pytest.mark.asyncio
async def test_pty_direct_editing_and_reboot(state_dir: Path) -> None:
    async with daemon(state_dir, config(card_toml("mic0", disk=None))) as client:
        card = await booted(client)
        path = _console_dev(await card.status())["pty"]
        async with card.console() as con:
            assert con.path == path
            assert await con.command("echo marker-1") == "marker-1\n"
            # line editing: backspace, Ctrl-U, Ctrl-C, escape sequences
            await con.write("echo abX\x7fc\r")
            await con.read_until(b"abc\r\n" + PROMPT)
            await con.write("garbage\x15echo k\x1b[Aept\r")
            await con.read_until(b"\r\nkept\r\n" + PROMPT)
            await con.write("half a line\x03")
            await con.read_until(b"^C\r\n" + PROMPT)
            # Ctrl-C stops a running command
            await con.sendline("sleep 30")
            await con.read_until(b"sleep 30\r\n")
            await con.write("\x03")
            await con.read_until(b"^C\r\n" + PROMPT)
            # a bad command or bad arguments: a message, the shell goes on
            assert await con.command("nosuch") == "sh: nosuch: command not found\n"
            assert "invalid number" in await con.command("dd bs=12Q")
            assert "syntax error" in await con.command("echo 'unbalanced")
            # Ctrl-D logs out; a new session starts
            await con.write("\x04")
            await con.read_until(b"logout\r\n")
            await con.read_until(PROMPT)
            assert "uname" in await con.command("help")
            # reboot from the console: the same pty carries the next boot
            await con.sendline("reboot")
            await con.read_until(b"going down for reboot", timeout=10)
            await eventually(
                lambda: _boots_online(client), within=30, what="mic0 online after its reboot"
            )
            await con.read_until(b"card OS (mic0)", timeout=15)
            await con.read_until(PROMPT)
            assert await con.command("echo marker-2") == "marker-2\n"
        assert (await card.status())["boots"] == 2
        # poweroff through the agent: the card goes down, status poweroff
        r = await card.exec("poweroff")
        assert (r.status, b"power-off" in r.stdout) == (0, True)
        await card.wait("ready", timeout=30)
        assert (await card.status())["shutdown_status"] == "poweroff"


async def _boots_online(client: Client) -> bool:
    st = await client.card("mic0").status()
    return st["boots"] == 2 and st["state"] == "online"


def _tmux(sock: str, *args: str) -> list[str]:
    return ["tmux", "-L", sock, *args]


@pytest.mark.asyncio
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
async def test_micctl_console_in_tmux(state_dir: Path) -> None:
    sock = f"mic-{state_dir.name}"
    micctl = f"{sys.executable} -m mic_host.micctl --state-dir {state_dir} console mic0"
    attach = f"exec {micctl}"
    # The first session reports micctl's exit status itself: tmux 3.3a sometimes
    # never reaps a pane's process (it stays a zombie, pane_dead=1 with an empty
    # pane_dead_status, about 1 run in 3 here), so #{pane_dead_status} cannot
    # be trusted; the shell that waited for micctl can.
    attach_and_report = f'{micctl}; echo "[micctl exited $?]"'
    try:
        async with daemon(state_dir, config(card_toml("mic0", disk=None))) as client:
            card = await booted(client)

            async def pane() -> str:
                return (await command(*_tmux(sock, "capture-pane", "-p", "-t", "c"))).out

            r = await command(*_tmux(sock, "new-session", "-d", "-s", "c", "-x", "120", "-y",
                                     "40", "-c", str(REPO), attach_and_report))  # fmt: skip
            assert r.rc == 0, r
            await command(*_tmux(sock, "set-option", "-t", "c", "remain-on-exit", "on"))
            await eventually(
                lambda: _contains(pane(), "Escape character is '^]'"), within=15, what="attached"
            )
            await command(*_tmux(sock, "send-keys", "-t", "c", "uname", "Enter"))
            await eventually(lambda: _contains(pane(), "\nMIC-VOP\n"), within=10, what="uname")
            # the terminal's size reached the card as RESIZE
            await command(*_tmux(sock, "send-keys", "-t", "c", "stty size", "Enter"))
            await eventually(lambda: _contains(pane(), "\n40 120\n"), within=10, what="size")
            await command(*_tmux(sock, "send-keys", "-t", "c", "C-]"))
            await eventually(
                lambda: _contains(pane(), "[detached: mic0 console]"), within=10, what="detach"
            )
            await eventually(
                lambda: _contains(pane(), "[micctl exited 0]"), within=10, what="micctl exited 0"
            )

            # the terminal goes away while attached: micctl ends, the console lives on.
            # Session d starts before c is killed: killing a server's last session
            # makes it exit, and a new-session racing that exit prints nothing.
            r = await command(*_tmux(sock, "new-session", "-d", "-s", "d", "-x", "80", "-y",
                                     "24", "-c", str(REPO), "-P", "-F", "#{pane_pid}",
                                     attach))  # fmt: skip
            assert r.rc == 0, r
            pid = int(r.out.strip())
            await command(*_tmux(sock, "kill-session", "-t", "c"))
            await eventually(
                lambda: _contains(
                    command(*_tmux(sock, "capture-pane", "-p", "-t", "d")), "Escape character"
                ),
                within=15,
                what="second attach",
            )
            await command(*_tmux(sock, "kill-session", "-t", "d"))
            await eventually(lambda: not alive(pid), within=10, what="micctl gone with its tty")
            async with card.console() as con:
                assert await con.command("echo after") == "after\n"
                assert await con.command("stty size") == "24 80\n"
    finally:
        await command(*_tmux(sock, "kill-server"))


async def _contains(text: object, needle: str) -> bool:
    value = await text  # type: ignore[misc]
    if not isinstance(value, str):
        value = value.out
    return needle in value


def test_docs_mention_the_protocol() -> None:
    doc = (REPO / "docs" / "console.md").read_text()
    for word in ("org.mic-vop.agent.0", "PORT_OPEN", "micctl console", "micctl exec", '"exec"'):
        assert word in doc, word
