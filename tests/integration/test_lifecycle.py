"""Card lifecycle through real processes: boot, shutdown, reset, crash, heartbeat loss,
a card that never comes online, a card that powers itself off or restarts, and
host suspend/resume. Each test drives a launched ``mic-host`` with the client
library and checks the card OS process itself (``/proc``), not only the state.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.helpers import (
    alive,
    app,
    booted,
    card_toml,
    config,
    daemon,
    eventually,
    group_members,
)
from virtio.errors import BrokenResourceError, LocalProtocolError, MicError


@pytest.mark.asyncio
async def test_boot_online_shutdown_ready(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        card = client.card("mic0")
        st = await card.status()
        assert (st["state"], st["pid"]) == ("ready", None)

        assert (await card.boot(wait=True, timeout=30))["state"] == "online"
        st = await card.status()
        assert st["state"] == "online"
        assert st["shutdown_status"] == "nop"
        pid = st["pid"]
        assert isinstance(pid, int)
        assert alive(pid)
        assert st["boot_seconds"] > 0
        assert [d["device"] for d in st["devices"]] == ["hvc0", "vda"]
        # the card OS really runs: an app answers from inside it
        assert (await card.run(app("echo"), 1, "two"))["value"] == {
            "card": "mic0",
            "args": [1, "two"],
        }

        assert (await card.shutdown(wait=True, timeout=30))["state"] == "ready"
        st = await card.status()
        assert (st["state"], st["shutdown_status"], st["pid"]) == ("ready", "halted", None)
        assert st["last_error"] is None
        assert not alive(pid)  # exited and reaped by the daemon


@pytest.mark.asyncio
async def test_refused_operations_change_nothing(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        card = client.card("mic0")
        with pytest.raises(LocalProtocolError, match="not online"):
            await card.run(app("echo"))
        with pytest.raises(LocalProtocolError, match="shutdown"):
            await card.shutdown(wait=True)
        with pytest.raises(LocalProtocolError, match="reset"):
            await card.reset()
        await booted(client)
        pid = (await card.status())["pid"]
        with pytest.raises(LocalProtocolError, match="boot needs ready"):
            await card.boot(wait=True)
        st = await card.status()
        assert (st["state"], st["pid"], st["boots"]) == ("online", pid, 1)
        with pytest.raises(LocalProtocolError, match="unknown card"):
            await client.card("mic9").boot()


@pytest.mark.asyncio
async def test_reset_online_card_then_boot_again(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        card = await booted(client)
        pid = (await card.status())["pid"]
        assert (await card.reset())["state"] == "ready"
        st = await card.status()
        assert (st["state"], st["pid"]) == ("ready", None)
        assert not alive(pid)

        await card.boot(wait=True, timeout=30)
        st = await card.status()
        assert (st["state"], st["boots"]) == ("online", 2)
        assert st["pid"] != pid
        assert (await card.run(app("devices")))["value"] == ["hvc0", "vda"]


@pytest.mark.asyncio
async def test_sigkill_card_is_crashed_and_disk_survives(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        card = await booted(client)
        await card.run(app("write_text"), "vda", 3, "written before the crash")
        pid = (await card.status())["pid"]

        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        await card.wait("crashed", timeout=5)
        assert time.monotonic() - t0 < 5
        st = await card.status()
        assert (st["state"], st["shutdown_status"], st["pid"]) == ("crashed", "crashed", None)
        assert "exited with status -9" in st["last_error"]

        # the daemon keeps answering, and its other operations still work
        assert (await client.ping())["pid"] != pid
        with pytest.raises(LocalProtocolError):
            await card.run(app("echo"))

        # boot from crashed (reset first, as mpssd does) and the flushed data is there
        await card.boot(wait=True, timeout=30)
        st = await card.status()
        assert (st["state"], st["shutdown_status"]) == ("online", "nop")
        got = await card.run(app("read_text"), "vda", 3, 100)
        assert got["value"] == "written before the crash"
    image = (state_dir / "mic0.img").read_bytes()
    assert image[3 * 512 : 3 * 512 + 24] == b"written before the crash"


@pytest.mark.asyncio
async def test_card_dying_mid_request(state_dir: Path) -> None:
    """The card OS kills itself while the host waits for an app's answer."""
    async with daemon(state_dir) as client:
        card = await booted(client)
        with pytest.raises(BrokenResourceError, match="mic0"):
            await card.run(app("suicide"))
        await card.wait("crashed", timeout=5)
        await card.boot(wait=True, timeout=30)
        assert (await card.run(app("echo")))["value"]["card"] == "mic0"


@pytest.mark.asyncio
async def test_hung_card_loses_heartbeat(state_dir: Path) -> None:
    """SIGSTOP: the process lives but says nothing; heartbeat_timeout makes it crashed."""
    cfg = config(card_toml(heartbeat_interval=0.1, heartbeat_timeout=1.0))
    async with daemon(state_dir, cfg) as client:
        card = await booted(client)
        pid = (await card.status())["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            await card.wait("crashed", timeout=5)
            elapsed = time.monotonic() - t0
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGCONT)
        assert 0.8 < elapsed < 5
        st = await card.status()
        assert st["shutdown_status"] == "crashed"
        assert "heartbeat" in st["last_error"]
        await eventually(lambda: not alive(pid), within=5, what="the hung card OS is killed")
        await card.boot(wait=True, timeout=30)


@pytest.mark.asyncio
async def test_card_that_never_comes_online(state_dir: Path) -> None:
    """A card OS that never connects (a wrapper that ignores the command appended to
    it): boot_timeout makes it reset_failed, nothing the wrapper started outlives
    the boot, the daemon and the other card are unharmed, and reset works.
    """
    hung = card_toml(boot_timeout=1, card_command=["sh", "-c", "sleep 30; exit 0", "x"])
    async with daemon(state_dir, config(hung, card_toml("mic1"))) as client:
        card = client.card("mic0")
        t0 = time.monotonic()
        await card.boot(wait=False)
        pid = (await card.status())["pid"]
        assert isinstance(pid, int)
        await card.wait("reset_failed", timeout=5)
        assert 0.9 < time.monotonic() - t0 < 5
        st = await card.status()
        assert st["pid"] is None
        assert "did not come online within 1.0s" in st["last_error"]
        # the wrapper and what it started (sleep) are gone: the process group is empty
        await eventually(
            lambda: not group_members(pid), within=3, what=f"process group {pid} is empty"
        )

        # the daemon and the other card are unharmed
        other = await booted(client, "mic1")
        assert (await other.run(app("echo")))["value"]["card"] == "mic1"

        assert (await card.reset())["state"] == "ready"
        # boot with wait reports the failure instead of hanging
        with pytest.raises(MicError, match="boot failed, card is reset_failed"):
            await card.boot(wait=True)
        assert (await other.status())["state"] == "online"


@pytest.mark.parametrize(("status", "final"), [("poweroff", "ready"), ("restart", "online")])
@pytest.mark.asyncio
async def test_card_shuts_itself_down(state_dir: Path, status: str, final: str) -> None:
    """The card OS halts on its own: poweroff leaves it ready; restart boots it again."""
    async with daemon(state_dir) as client:
        card = await booted(client)
        pid = (await card.status())["pid"]
        async with card.events(["state"]) as events:
            await card.run(app("power"), status)
            # the card went down by itself, with the status it gave ...
            down = await events.wait_for("ready", timeout=10)
            assert (down.data["from"], down.data["shutdown_status"]) == ("shutting_down", status)
            if status == "restart":  # ... and mpssd's restart boots it again
                assert (await events.wait_for("booting", timeout=10)).data["cause"] == "boot"
                await events.wait_for(final, timeout=30)
        await eventually(lambda: not alive(pid), within=5, what="the card OS exits")
        st = await card.status()
        if status == "poweroff":
            assert (st["shutdown_status"], st["boots"], st["pid"]) == ("poweroff", 1, None)
        else:
            assert (st["boots"], st["shutdown_status"]) == (2, "nop")
            assert st["pid"] not in (None, pid)
            assert (await card.run(app("devices")))["value"] == ["hvc0", "vda"]


@pytest.mark.asyncio
async def test_shutdown_stops_running_apps(state_dir: Path) -> None:
    """An app still running (sleeping) does not hold an orderly shutdown up until
    the host's shutdown_timeout resets the card.
    """
    async with daemon(state_dir) as client:
        card = await booted(client)
        sleeper = asyncio.ensure_future(card.run(app("sleep"), 60))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await card.shutdown(wait=True, timeout=30)
        assert time.monotonic() - t0 < 5
        st = await card.status()
        assert (st["state"], st["shutdown_status"], st["last_error"]) == ("ready", "halted", None)
        with pytest.raises(BrokenResourceError):
            await sleeper


@pytest.mark.asyncio
async def test_suspend_resume(state_dir: Path) -> None:
    cfg = config(card_toml("mic0"), card_toml("mic1"), card_toml("mic2"))
    async with daemon(state_dir, cfg) as client:
        mic0 = await booted(client, "mic0")
        mic1 = await booted(client, "mic1")
        pids = {c: (await client.card(c).status())["pid"] for c in ("mic0", "mic1")}
        await mic1.shutdown(wait=True)  # mic1 ready, mic2 never booted
        await mic1.boot(wait=True)

        res = await client.suspend()
        assert res["suspended"] is True
        assert sorted(res["resume"]) == ["mic0", "mic1"]
        st = await client.status()
        assert st["suspended"] is True
        assert {c["name"]: (c["state"], c["pid"]) for c in st["cards"]} == {
            "mic0": ("ready", None),
            "mic1": ("ready", None),
            "mic2": ("ready", None),
        }
        assert not alive(pids["mic0"])
        with pytest.raises(LocalProtocolError, match="suspended"):
            await client.card("mic2").boot(wait=True)
        with pytest.raises(LocalProtocolError, match="suspended"):
            await mic0.boot(wait=True)
        assert (await client.suspend())["suspended"] is True  # idempotent

        res = await client.resume()
        assert sorted(res["booted"]) == ["mic0", "mic1"]
        st = await client.status()
        assert st["suspended"] is False
        assert {c["name"]: c["state"] for c in st["cards"]} == {
            "mic0": "online",
            "mic1": "online",
            "mic2": "ready",
        }
        # really running again: the apps answer from new card OS processes
        assert (await mic0.run(app("echo")))["value"]["card"] == "mic0"
        assert (await mic0.status())["pid"] != pids["mic0"]
        await client.card("mic2").boot(wait=True)
