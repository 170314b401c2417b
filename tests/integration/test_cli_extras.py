"""What people reach for, through real processes: several cards per command and
``--all``, ``reboot``, ``--version``, ``mic-host --check-config`` and
``--print-default-config``, ``micctl help``, bash completion, the one default
state directory of ``make run`` and ``micctl``, and what ``make run`` installs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from mic_host.config import DEFAULT_CONFIG_TOML
from mic_host.micctl.topics import TOPICS
from tests.integration.helpers import (
    REPO,
    alive,
    booted,
    card_toml,
    command,
    config,
    daemon,
    eventually,
    mic_host_cmd,
    micctl,
)

VERSION = metadata.version("mic-vop")


def _errors(err: str) -> list[str]:
    lines = err.splitlines()
    assert all(line.startswith("micctl: ") for line in lines), err
    return lines


@pytest.mark.asyncio
async def test_several_cards_all_and_reboot(state_dir: Path) -> None:
    cfg = config(card_toml("mic0", disk=None), card_toml("mic1", disk=None))
    async with daemon(state_dir, cfg) as client:
        r = await micctl(state_dir, "boot", "mic0", "mic1", "--wait", "--timeout", "60")
        assert (r.rc, r.out, r.err) == (0, "mic0: online\nmic1: online\n", ""), r
        pids = {n: (await client.card(n).status())["pid"] for n in ("mic0", "mic1")}

        # status of several cards; an unknown one fails alone, the others still print
        r = await micctl(state_dir, "status", "mic1", "mic0")
        assert r.rc == 0, r
        assert [row.split()[:2] for row in r.out.splitlines()[1:]] == [
            ["mic1", "online"], ["mic0", "online"],
        ]  # fmt: skip
        r = await micctl(state_dir, "status", "mic1", "mic7")
        assert r.rc == 1, r
        assert [row.split()[0] for row in r.out.splitlines()[1:]] == ["mic1"]
        (err,) = _errors(r.err)
        assert err.startswith("micctl: unknown card 'mic7'"), err
        r = await micctl(state_dir, "status", "--all", "--json")
        assert [c["name"] for c in r.json()["cards"]] == ["mic0", "mic1"]

        # --all: every card; each refusal is its own line, exit 1
        r = await micctl(state_dir, "boot", "--all")
        assert (r.rc, r.out) == (1, ""), r
        errs = _errors(r.err)
        assert len(errs) == 2, errs
        for name, err in zip(("mic0", "mic1"), errs, strict=True):
            assert name in err, errs
            assert "state is online" in err, errs

        # reboot: down and up again, a new card OS process; the other card untouched
        r = await micctl(state_dir, "reboot", "mic0", "--wait", "--timeout", "60")
        assert (r.rc, r.out, r.err) == (0, "mic0: online\n", ""), r
        st0, st1 = await client.card("mic0").status(), await client.card("mic1").status()
        assert st0["state"] == "online"
        assert st0["pid"] != pids["mic0"]
        assert not alive(pids["mic0"])
        assert (st1["state"], st1["pid"]) == ("online", pids["mic1"])

        r = await micctl(state_dir, "shutdown", "--all", "--wait", "--timeout", "60")
        assert (r.rc, r.out, r.err) == (0, "mic0: ready\nmic1: ready\n", ""), r
        # reboot of a ready card boots it; without --wait it reports booting
        r = await micctl(state_dir, "reboot", "mic1")
        assert (r.rc, r.out) == (0, "mic1: booting\n"), r
        r = await micctl(state_dir, "wait", "mic1", "online", "--timeout", "60")
        assert (r.rc, r.out) == (0, "mic1: online\n"), r

        # a partial failure: mic0 is ready, mic1 never gets there in time
        r = await micctl(state_dir, "wait", "--all", "ready", "--timeout", "0.5")
        assert (r.rc, r.out) == (1, "mic0: ready\n"), r
        (err,) = _errors(r.err)
        assert "mic1" in err, err
        r = await micctl(state_dir, "reset", "mic1", "mic0")
        assert r.rc == 1, r  # mic0 is ready: nothing to reset
        assert r.out in ("mic1: resetting\n", "mic1: ready\n"), r
        assert "cannot reset mic0" in _errors(r.err)[0], r
        r = await micctl(state_dir, "wait", "mic0", "mic1", "ready", "--timeout", "30")
        assert (r.rc, r.out) == (0, "mic0: ready\nmic1: ready\n"), r

        # usage: no card, or cards and --all
        for args in (("boot",), ("shutdown", "mic0", "--all"), ("wait", "online"), ("reboot",)):
            r = await micctl(state_dir, *args)
            assert r.rc == 2, (args, r)
            assert len(_errors(r.err)) == 1, r
        r = await micctl(state_dir, "status", "mic0", "--all")
        assert r.rc == 2, r


@pytest.mark.asyncio
async def test_versions_and_config_tools(state_dir: Path) -> None:
    r = await command(sys.executable, "-m", "mic_host.micctl", "--version")
    assert (r.rc, r.out) == (0, f"micctl {VERSION}\n"), r
    r = await mic_host_cmd("--version")
    assert (r.rc, r.out) == (0, f"mic-host {VERSION}\n"), r

    # the embedded default, printed, is a valid config file
    r = await mic_host_cmd("--print-default-config")
    assert (r.rc, r.out) == (0, DEFAULT_CONFIG_TOML), r
    default = state_dir / "default.toml"
    default.write_text(r.out)
    fresh = state_dir / "never-created"
    r = await mic_host_cmd("--state-dir", str(fresh), "--check-config", str(default))
    assert r.rc == 0, r
    assert r.out.splitlines() == [
        f"{default}: valid",
        f"state directory: {fresh}",
        "mic0: boots at start, card RAM 64M, host RAM 16M, 2 device(s)",
        "    console",
        f"    block (disk): image={fresh}/mic0.img size=64M create=true",
    ]

    # invalid configs: one line naming the file and the problem, exit 1
    bad = state_dir / "bad.toml"
    cases = {
        'version = 1\n[[cards]]\nname = "gpu0"\n': "bad card name 'gpu0'",
        'version = 1\n[[cards]]\nname = "mic0"\ncard_ram = "3K"\n': "card_ram",
        'version = 1\n[[cards]]\nname = "mic0"\n[[cards.devices]]\ntype = "floppy"\n': "floppy",
        "version = 1\n[[cards]\n": "bad.toml",
    }
    for text, needle in cases.items():
        bad.write_text(text)
        r = await mic_host_cmd("--state-dir", str(fresh), "--check-config", str(bad))
        assert (r.rc, r.out) == (1, ""), (text, r)
        assert len(r.err.splitlines()) == 1, r
        assert r.err.startswith("mic-host: "), (text, r)
        assert needle in r.err, (text, r)
    r = await mic_host_cmd("--state-dir", str(fresh), "--check-config", str(state_dir / "nope"))
    assert (r.rc, "nope" in r.err) == (1, True), r
    # nothing was started or created: no state directory, no lock, no log
    assert not fresh.exists()
    assert sorted(os.listdir(state_dir)) == ["bad.toml", "default.toml"]


@pytest.mark.asyncio
async def test_help_topics_without_a_daemon(state_dir: Path) -> None:
    nowhere = state_dir / "none"
    r = await micctl(nowhere, "help")
    assert r.rc == 0, r
    for topic in TOPICS:
        assert f"  {topic} " in r.out
    for cmd in ("boot", "reboot", "exec", "completion"):
        assert f"  {cmd} " in r.out
    for topic, needles in {
        "config": ("--print-default-config", "--check-config", "MIC_STATE_DIR", "[[cards]]"),
        "devices": ("micctl attach", "micctl detach", "console", "net"),
        "apps": ("micctl run", "async def main(card)"),
        "exec": ("--shell", "stdin", "127"),
        "console": ("Ctrl-]", "--print-path"),
        "images": ("--copy-from", "--preallocate", "--read-only"),
    }.items():
        r = await micctl(nowhere, "help", topic)
        assert r.rc == 0, r
        for needle in needles:
            assert needle in r.out, (topic, needle)
    r = await micctl(nowhere, "help", "reboot")
    assert (r.rc, r.out.startswith("usage: micctl reboot")) == (0, True), r
    assert "--all" in r.out
    r = await micctl(nowhere, "help", "nope")
    assert (r.rc, r.err.startswith("micctl: ")) == (2, True), r
    # every subcommand's --help stands alone (no pointer to docs/ for the essentials)
    r = await micctl(nowhere, "--help")
    assert "micctl help" in r.out, r
    assert "docs/" not in r.out, r
    assert not nowhere.exists()


def _complete(script: str, *words: str) -> list[str]:
    """COMPREPLY of bash's ``_micctl`` for ``words`` (the last one is being completed)."""
    driver = (
        f"{script}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n'
        '_micctl; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    bash = shutil.which("bash")
    assert bash is not None
    out = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", driver, "bash", *words],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=True,
    ).stdout  # fmt: skip
    return sorted(w for w in out.splitlines() if w)


@pytest.mark.asyncio
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
async def test_bash_completion(state_dir: Path) -> None:
    r = await micctl(state_dir, "completion", "bash")
    assert r.rc == 0, r
    script = r.out
    assert "complete -F _micctl micctl" in script
    mc = f"{sys.executable} -m mic_host.micctl"
    # COMP_WORDS[0] is how the user called micctl: the script calls it back for card names
    wrapper = state_dir / "micctl"
    wrapper.write_text(f'#!/bin/sh\nexec {mc} "$@"\n')
    wrapper.chmod(0o700)
    m = str(wrapper)
    assert await asyncio.to_thread(_complete, script, m, "bo") == ["boot"]
    assert await asyncio.to_thread(_complete, script, m, "re") == ["reboot", "reset", "resume"]
    assert await asyncio.to_thread(_complete, script, m, "boot", "--w") == ["--wait"]
    assert await asyncio.to_thread(_complete, script, m, "exec", "mic0", "--sh") == ["--shell"]
    assert await asyncio.to_thread(_complete, script, m, "net", "mic0", "--link", "") == [
        "down", "up",
    ]  # fmt: skip
    assert await asyncio.to_thread(_complete, script, m, "help", "co") == [
        "completion", "config", "console",
    ]  # fmt: skip
    assert await asyncio.to_thread(_complete, script, m, "--") == [
        "--help", "--state-dir", "--version",
    ]  # fmt: skip
    # card names come from the daemon (none here: nothing, quietly)
    sd = str(state_dir)
    assert await asyncio.to_thread(_complete, script, m, "--state-dir", sd, "boot", "m") == []
    cfg = config(card_toml("mic0", disk=None), card_toml("mic1", disk=None))
    async with daemon(state_dir, cfg):
        words = await asyncio.to_thread(_complete, script, m, "--state-dir", sd, "boot", "m")
        assert words == ["mic0", "mic1"]
        words = await asyncio.to_thread(
            _complete, script, m, "--state-dir", sd, "wait", "mic1", "o"
        )
        assert words == ["online"]
        # exec takes one card: after it, no card names
        words = await asyncio.to_thread(
            _complete, script, m, "--state-dir", sd, "exec", "mic0", "m"
        )
        assert words == []
    # the parser and the script agree on the subcommands
    r = await micctl(state_dir, "help")
    listed = [line.split()[0] for line in r.out.split("Commands", 1)[1].splitlines()[1:] if line]
    assert await asyncio.to_thread(_complete, script, m, "") == sorted(listed)


@pytest.mark.asyncio
async def test_make_run_and_micctl_share_the_default_state_dir(state_dir: Path) -> None:
    """The README's quick start as written: ``make run``, then ``micctl`` with no export."""
    if shutil.which("make") is None or not (REPO / ".venv/bin/micctl").exists():
        pytest.skip("needs make and the project's .venv (make install)")
    env = {k: v for k, v in os.environ.items() if k not in ("MIC_STATE_DIR", "XDG_STATE_HOME")}
    env["HOME"] = str(state_dir)  # the default, ~/.local/state/mic-vop, lands here
    # -o: the venv is there already (this test runs in it); never reinstall from a test
    proc = await asyncio.create_subprocess_exec(
        "make", "-s", "-o", ".venv/.installed-run", "run",
        cwd=REPO, env=env, start_new_session=True,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    default = state_dir / ".local/state/mic-vop"
    try:

        async def micctl_here(*args: str) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(
                subprocess.run, [str(REPO / ".venv/bin/micctl"), *args],
                capture_output=True, text=True, timeout=90, cwd="/", env=env,
            )  # fmt: skip

        r = await micctl_here("wait", "mic0", "online", "--timeout", "60")
        for _ in range(100):  # the daemon may not be listening yet
            if r.returncode == 0 or "no mic-host daemon" not in r.stderr:
                break
            await asyncio.sleep(0.2)
            r = await micctl_here("wait", "mic0", "online", "--timeout", "60")
        assert (r.returncode, r.stdout) == (0, "mic0: online\n"), r
        r = await micctl_here("status")
        assert r.stdout.splitlines()[1].split()[:2] == ["mic0", "online"], r
        assert (default / "control.sock").exists()
        assert (default / "mic0.img").exists()
        # the client library's connect() with no argument finds it too
        code = (
            "import asyncio, mic_host\n"
            "async def main():\n"
            "    async with mic_host.connect() as c:\n"
            "        print((await c.card('mic0').status())['state'])\n"
            "asyncio.run(main())\n"
        )
        r2 = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", code],
            capture_output=True, text=True, timeout=60, cwd="/", env=env,
        )  # fmt: skip
        assert (r2.returncode, r2.stdout) == (0, "online\n"), r2
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the make terminal
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            out = (await proc.stdout.read()).decode(errors="replace")
            await proc.wait()
    assert f"state directory {default}" in out, out
    await eventually(
        lambda: not (default / "control.sock").exists(), within=10, what="daemon stopped"
    )


@pytest.mark.asyncio
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
async def test_make_run_installs_runtime_and_build_and_test_adds_the_tools(state_dir: Path) -> None:
    venv = state_dir / "venv"
    # a fresh clone: `make run` creates the venv, installs the project with what
    # compiles the ring core (no test tools), and compiles it before the daemon starts
    r = await command("make", "-n", "run", f"VENV={venv}")
    assert r.rc == 0, r
    installs = [line for line in r.out.splitlines() if "pip install" in line]
    assert installs == [
        f"{venv}/bin/python -m pip install --quiet --upgrade pip",
        f"{venv}/bin/python -m pip install --quiet -e '.[build]'",
    ], r.out
    build = r.out.index(f"{venv}/bin/python -m tools.mypyc_build\n")
    assert build < r.out.index(f"{venv}/bin/mic-host\n"), r.out
    assert f"{venv}/bin/mic-host\n" in r.out  # no --state-dir: the shared default
    assert ".mic-state" not in r.out
    assert "MIC_STATE_DIR=" not in r.out
    # after `make run`: `make test` adds the test extra only, and runs the gates
    venv.mkdir()
    (venv / ".installed-run").touch()
    r = await command("make", "-n", "test", f"VENV={venv}")
    assert r.rc == 0, r
    installs = [line for line in r.out.splitlines() if "pip install" in line]
    assert installs == [f"{venv}/bin/python -m pip install --quiet -e '.[test]'"], r.out
    assert f"{venv}/bin/python -m pytest" in r.out
    # after `make test`, `make run` installs nothing
    (venv / ".installed-test").touch()
    r = await command("make", "-n", "run", f"VENV={venv}")
    assert "pip install" not in r.out, r.out


@pytest.mark.asyncio
async def test_a_closed_stdout_ends_micctl_quietly_with_141(state_dir: Path) -> None:
    """``micctl stats mic0 | head -1``: the reader leaves; micctl exits 141, no traceback."""
    r0, w0 = os.pipe()
    os.close(r0)  # the reader is gone before micctl writes
    async with daemon(state_dir) as client:
        await booted(client)
        for argv in (("stats", "mic0"), ("status",), ("help",)):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mic_host.micctl", "--state-dir", str(state_dir), *argv,
                stdout=w0, stderr=subprocess.PIPE, cwd=REPO,
            )  # fmt: skip
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            assert (proc.returncode, err) == (141, b""), (argv, proc.returncode, err)
    os.close(w0)
