"""``micctl`` and ``mic-host`` as the user runs them: separate processes, exit codes,
one-line errors on stderr, output formats; the daemon's refusals at startup.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    alive,
    app,
    block_toml,
    card_toml,
    config,
    daemon,
    mic_host_cmd,
    micctl,
)
from virtio.errors import ConfigError


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("micctl: "), lines[0]
    return lines[0]


def _app_error(err: str) -> tuple[str, str]:
    """A failed app on stderr: its card-side traceback, then one ``micctl:`` line."""
    *tb, last = err.splitlines()
    assert last.startswith("micctl: "), err
    assert tb[:1] == ["Traceback (most recent call last):"], err
    return "\n".join(tb), last


@pytest.mark.asyncio
async def test_micctl_lifecycle(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        r = await micctl(state_dir, "ping")
        assert r.rc == 0, r
        assert r.out.startswith(f"mic-host pid {(await client.ping())['pid']}, protocol 1")

        r = await micctl(state_dir, "status")
        assert r.rc == 0, r
        header, row = r.out.splitlines()
        assert header.split() == ["CARD", "STATE", "SHUTDOWN", "PID", "DEVICES"]
        assert row.split()[:4] == ["mic0", "ready", "nop", "-"]

        r = await micctl(state_dir, "boot", "mic0", "--wait", "--timeout", "30")
        assert (r.rc, r.out, r.err) == (0, "mic0: online\n", ""), r
        pid = (await client.card("mic0").status())["pid"]
        r = await micctl(state_dir, "status", "mic0")
        assert r.out.splitlines()[1].split()[:4] == ["mic0", "online", "nop", str(pid)]
        assert "vda:block(disk)" in r.out
        assert "hvc0:console" in r.out
        r = await micctl(state_dir, "status", "--json")
        assert r.rc == 0
        (card,) = r.json()["cards"]
        assert (card["name"], card["state"], card["pid"]) == ("mic0", "online", pid)

        # boot of an online card: refused, exit 1, one line, nothing changed
        r = await micctl(state_dir, "boot", "mic0")
        assert r.rc == 1, r
        assert r.out == ""
        assert "state is online" in _one_error_line(r.err)
        assert (await client.card("mic0").status())["pid"] == pid

        # unknown card (well formed): the daemon refuses it
        r = await micctl(state_dir, "boot", "mic7")
        assert r.rc == 1, r
        assert _one_error_line(r.err).startswith("micctl: unknown card 'mic7'")
        # a malformed card name or command is a usage error (2), also one line
        r = await micctl(state_dir, "boot", "gpu0")
        assert r.rc == 2, r
        assert "bad card name" in _one_error_line(r.err)
        r = await micctl(state_dir, "frobnicate")
        assert r.rc == 2, r
        _one_error_line(r.err)

        r = await micctl(state_dir, "wait", "mic0", "online", "--timeout", "5")
        assert (r.rc, r.out) == (0, "mic0: online\n"), r
        r = await micctl(state_dir, "shutdown", "mic0", "--wait", "--timeout", "30")
        assert (r.rc, r.out) == (0, "mic0: ready\n"), r
        assert not alive(pid)
        st = await client.card("mic0").status()
        assert (st["state"], st["shutdown_status"]) == ("ready", "halted")

        # a wait that cannot be met in time: exit 1, says where the card is
        r = await micctl(state_dir, "wait", "mic0", "online", "--timeout", "0.3")
        assert r.rc == 1, r
        assert "still ready" in _one_error_line(r.err)

        # reset of a ready card is refused; of an online card it works
        r = await micctl(state_dir, "reset", "mic0")
        assert r.rc == 1, r
        await client.card("mic0").boot(wait=True)
        r = await micctl(state_dir, "reset", "mic0")
        assert r.rc == 0, r
        assert r.out.strip() in ("mic0: ready", "mic0: resetting")
        await client.card("mic0").wait("ready", timeout=10)


@pytest.mark.asyncio
async def test_micctl_without_daemon(state_dir: Path) -> None:
    r = await micctl(state_dir, "status")
    assert r.rc == 1, r
    line = _one_error_line(r.err)
    assert f"no mic-host daemon at {state_dir}" in line
    assert "control.sock missing" in line


@pytest.mark.asyncio
async def test_micctl_run_and_stats(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        await client.card("mic0").boot(wait=True)

        r = await micctl(state_dir, "run", "mic0", app("echo"), "a", "-b", "3")
        assert r.rc == 0, r
        assert json.loads(r.out) == {"card": "mic0", "args": ["a", "-b", "3"]}
        r = await micctl(state_dir, "run", "mic0", app("capacity"), "vda")
        assert (r.rc, r.out) == (0, "2048\n"), r  # 1 MiB disk, in sectors

        r = await micctl(state_dir, "run", "mic0", app("fail"), "out of cheese")
        assert r.rc == 1, r
        assert r.out == ""
        tb, line = _app_error(r.err)
        assert "ValueError: out of cheese" in line
        assert 'tests/integration/apps.py", line' in tb, tb
        r = await micctl(state_dir, "run", "mic0", "tests.integration.nosuch:main")
        assert r.rc == 1, r
        assert "no module named 'tests.integration.nosuch'" in _one_error_line(r.err)
        r = await micctl(state_dir, "run", "mic0", app("read_text"), "vdz", "0", "1")
        assert r.rc == 1, r
        assert "no device 'vdz'" in _app_error(r.err)[1]

        def block_dev(stats: dict[str, object]) -> dict[str, Any]:
            devices = stats["devices"]
            assert isinstance(devices, list)
            (vda,) = [d for d in devices if d["device"] == "vda"]
            return vda  # type: ignore[no-any-return]

        r = await micctl(state_dir, "stats", "mic0", "--json")
        assert r.rc == 0, r
        before = block_dev(r.json())
        await client.card("mic0").run(app("write_text"), "vda", 0, "x" * 4096)
        await client.card("mic0").run(app("read_text"), "vda", 0, 4096)
        r = await micctl(state_dir, "stats", "mic0", "--json")
        after = block_dev(r.json())
        (q0,), (q1,) = before["queues"], after["queues"]
        assert q1["buffers"] >= q0["buffers"] + 3  # write, flush, read
        assert q1["chains"] >= q0["chains"] + 3
        assert q1["bytes"] >= q0["bytes"] + 2 * 4096
        assert q1["wakeups"] > q0["wakeups"]
        assert q1["interrupts"] > q0["interrupts"]
        assert q1["errors"] == 0
        # the doorbell is the device's; the backend's own counters come along
        assert after["doorbells"] > before["doorbells"]
        assert after["backend"]["writes"] >= before["backend"]["writes"] + 1
        assert after["backend"]["io_errors"] == 0

        r = await micctl(state_dir, "stats", "mic0")
        assert r.rc == 0, r
        lines = r.out.splitlines()
        assert lines[0].split() == [
            "DEVICE",
            "DOORBELLS",
            "QUEUE",
            "WAKEUPS",
            "CHAINS",
            "BUFFERS",
            "INTERRUPTS",
            "BYTES",
            "ERRORS",
        ]
        table = lines[: lines.index("backend counters:")]
        # one row per queue; the device (and its doorbells) only on its first
        (vda_row,) = [line for line in table if line.startswith("vda:block(disk)")]
        assert vda_row.split()[1] == str(after["doorbells"])
        # rx and tx of port 0, of the control queue and of the agent's port
        hvc0 = next(i for i, line in enumerate(table) if line.startswith("hvc0:console"))
        assert [line.split()[0] for line in table[hvc0 + 1 : hvc0 + 6]] == list("12345")
        backend = {line.split(":")[0].strip() for line in lines[len(table) + 1 :]}
        assert backend == {"hvc0", "vda"}
        assert "io_errors 0" in next(line for line in lines if line.startswith("  vda:"))

        await client.card("mic0").shutdown(wait=True)
        r = await micctl(state_dir, "stats", "mic0", "--json")
        assert r.rc == 1, r
        r = await micctl(state_dir, "run", "mic0", app("echo"))
        assert r.rc == 1, r
        assert "not online" in _one_error_line(r.err)


@pytest.mark.asyncio
async def test_micctl_attach_detach(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        await client.card("mic0").boot(wait=True)
        image = state_dir / "extra.img"
        r = await micctl(
            state_dir, "attach", "mic0", "block", "--image", str(image), "--size", "1M", "--create"
        )
        assert (r.rc, r.out) == (0, "vdb\n"), r
        assert image.stat().st_size == 1 << 20
        r = await micctl(state_dir, "status", "mic0")
        assert "vdb:block" in r.out
        r = await micctl(state_dir, "detach", "mic0", "vdb")
        assert (r.rc, r.out) == (0, ""), r
        r = await micctl(state_dir, "detach", "mic0", "vdb")
        assert r.rc == 1, r
        assert "no device 'vdb'" in _one_error_line(r.err)
        r = await micctl(state_dir, "attach", "mic0", "block", "--size", "1M")
        assert r.rc == 1, r
        assert "image" in _one_error_line(r.err)


@pytest.mark.asyncio
async def test_second_daemon_is_refused(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        pid = (await client.ping())["pid"]
        r = await mic_host_cmd("--state-dir", str(state_dir))
        assert r.rc == 2, r
        assert r.err.strip() == (
            f"mic-host: {state_dir}: another mic-host (pid {pid}) owns this state directory"
        )
        # the first daemon still owns its socket and answers
        assert (await client.ping())["pid"] == pid
        r = await micctl(state_dir, "ping")
        assert r.rc == 0, r


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (config(card_toml(), card_toml()), "cards[1].name", "duplicate card name 'mic0'"),
        (config(card_toml(boot_timeout="soon")), "cards[0].boot_timeout", ""),
        (config(card_toml(card_commnd=["x"])), "cards[0]", "card_commnd"),
        (config(card_toml(card_command="sh")), "cards[0].card_command", "array"),
        (
            config(card_toml(disk=None) + block_toml("x.img", size="64X")),
            "cards[0].devices[1].options.size",
            "bad size '64X'",
        ),
    ],
)
@pytest.mark.asyncio
async def test_invalid_config_names_file_and_key(
    state_dir: Path, text: str, key: str, problem: str
) -> None:
    path = state_dir / "host.toml"
    path.write_text(text)
    r = await mic_host_cmd("--state-dir", str(state_dir), "--config", str(path))
    assert r.rc == 2, r
    (line,) = r.err.splitlines()
    assert line.startswith(f"mic-host: {path}: {key}"), line
    assert problem in line
    assert not (state_dir / "control.sock").exists()
    # the client library checks TOML text before starting anything
    with pytest.raises(ConfigError, match=re.escape(f"launch(config=...): {key}")):
        async with daemon(state_dir, text):
            pass  # pragma: no cover


@pytest.mark.asyncio
async def test_daemon_refuses_missing_config_and_long_state_dir(state_dir: Path) -> None:
    missing = state_dir / "nope.toml"
    r = await mic_host_cmd("--state-dir", str(state_dir), "--config", str(missing))
    assert r.rc == 2, r
    assert str(missing) in r.err
    assert len(r.err.splitlines()) == 1
    long_dir = state_dir / ("d" * 110)
    r = await mic_host_cmd("--state-dir", str(long_dir))
    assert r.rc == 2, r
    (line,) = r.err.splitlines()
    assert line.startswith(f"mic-host: {long_dir}/control.sock: control socket path is longer")
    assert not long_dir.exists()
    # nothing was started: a daemon in the good directory works
    async with daemon(state_dir) as client:
        assert (await client.status())["cards"][0]["state"] == "ready"
