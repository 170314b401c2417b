"""The event stream (``micctl events``, ``client.events()``) and ``micctl logs``,
through a real daemon, real card OS processes and ``micctl`` as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from mic_host.client import Client, EventStream
from mic_host.events import Event
from tests.integration.helpers import REPO, app, booted, daemon, eventually, micctl
from tests.net.test_e2e import net_card
from virtio.errors import LocalProtocolError, MicError, MicTimeoutError, RemoteProtocolError

pytestmark = pytest.mark.asyncio


@asynccontextmanager
async def micctl_proc(state_dir: Path, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``micctl ARGS`` running (stdout piped); killed after the block if still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mic_host.micctl", "--state-dir", str(state_dir), *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def read_json_until(
    proc: asyncio.subprocess.Process, done: Any, timeout: float = 30
) -> list[dict[str, Any]]:
    """JSON lines from ``proc`` until ``done(obj)``."""
    assert proc.stdout is not None
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            line = await proc.stdout.readline()
            assert line, f"micctl events ended early after {out}"
            out.append(json.loads(line))
            if done(out[-1]):
                return out


async def subscribed(proc: asyncio.subprocess.Process, client: Client) -> None:
    """Return once ``micctl events`` (showing app events) has subscribed: it runs on
    its own schedule, so run a marker app until micctl prints a line."""
    assert proc.stdout is not None
    for _ in range(60):
        await client.card("mic0").run(app("echo"), "marker")
        try:
            async with asyncio.timeout(0.5):
                line = await proc.stdout.readline()
        except TimeoutError:
            continue
        assert b"app_" in line, line
        return
    pytest.fail("micctl events printed nothing")


async def test_micctl_events_json_lifecycle_devices_apps(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        card = await booted(client)
        async with micctl_proc(state_dir, "events", "mic0", "--json") as proc:
            await subscribed(proc, client)

            await card.attach_block(state_dir / "hot.img", size="1M", create=True)
            await card.detach("vdb")
            with pytest.raises(RemoteProtocolError):
                await card.run(app("fail"), "on purpose")
            await card.shutdown(wait=True, timeout=30)
            await card.boot(wait=True, timeout=30)
            await card.reset()
            got = await read_json_until(
                proc, lambda e: e["event"] == "ready" and e["data"]["cause"] == "reset_done"
            )
            proc.send_signal(signal.SIGINT)
            async with asyncio.timeout(10):
                assert await proc.wait() == 130

    kinds = [e["event"] for e in got]
    assert [k for k in kinds if not k.startswith("app_")] == [
        "device_added", "device_removed",
        "shutting_down", "ready", "booting", "device_added", "device_added", "online",
        "resetting", "ready",
    ]  # fmt: skip
    added = got[kinds.index("device_added")]
    assert added["card"] == "mic0"
    assert added["data"] == {"name": "block2", "device": "vdb", "type": "block", "boot": False}
    at_boot = [e["data"] for e in got if e["event"] == "device_added" and e["data"]["boot"]]
    assert {(d["device"], d["type"]) for d in at_boot} == {("vda", "block"), ("hvc0", "console")}
    assert got[kinds.index("device_removed")]["data"] == {"name": "block2"}
    mine = [e for e in got if e["data"].get("app") != app("echo")]  # not the markers
    started = [e for e in mine if e["event"] == "app_started"]
    ended = [e for e in mine if e["event"] == "app_ended"]
    assert [e["data"]["app"] for e in started] == [app("fail")]
    assert ended[0]["data"]["run"] == started[0]["data"]["run"]
    assert ended[0]["data"]["ok"] is False
    assert "on purpose" in ended[0]["data"]["error"]
    states = [e for e in got if e["event"] in ("ready", "online", "shutting_down")]
    assert states[1]["data"] == {
        "from": "shutting_down",
        "cause": "shutdown_done",
        "shutdown_status": "halted",
    }
    # QMP's timestamp, ISO time, a monotonic clock and sequence numbers that only grow
    for e in got:
        assert set(e) == {"event", "card", "data", "timestamp", "time", "monotonic", "seq"}
        assert abs(e["timestamp"]["seconds"] - time.time()) < 120
        assert e["time"].endswith("+00:00")
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(set(seqs))
    monos = [e["monotonic"] for e in got]
    assert monos == sorted(monos)


async def test_devices_present_at_boot_are_announced_before_online(state_dir: Path) -> None:
    """A subscriber learns every device from the stream: the ones the card finds at
    boot come as ``device_added`` with ``boot: true`` just before ``online``, with
    their card names; one attached while the card is down is announced then
    (no card name yet) and again, named, when the card boots."""
    async with daemon(state_dir) as client:
        card = client.card("mic0")
        async with card.events(["device", "state"]) as evs:
            await card.attach_block(state_dir / "cold.img", size="1M", create=True)
            cold = await evs.wait_for("device_added", "mic0", timeout=10)
            assert cold.data == {"name": "block2", "device": None, "type": "block", "boot": False}
            await card.boot(wait=True, timeout=30)
            await evs.wait_for("online", "mic0", timeout=30)
            devices = (await card.status())["devices"]
            await card.shutdown(wait=True, timeout=30)
            await card.boot(wait=False)
            await evs.wait_for("online", "mic0", timeout=30)
        boots = [i for i, e in enumerate(evs.seen) if e.kind == "booting"]
        assert len(boots) == 2
        expected = {(d["name"], d["device"], d["type"]) for d in devices}
        assert {("disk", "vda", "block"), ("block2", "vdb", "block")} <= expected
        assert len(expected) == 3  # and the console
        for first in boots:  # both boots: booting, one device_added per device, online
            run = evs.seen[first : first + len(expected) + 2]
            assert [e.kind for e in run] == ["booting"] + ["device_added"] * 3 + ["online"]
            added = [e.data for e in run[1:-1]]
            assert all(d["boot"] is True for d in added)
            assert {(d["name"], d["device"], d["type"]) for d in added} == expected


async def test_micctl_events_human_lines_and_filters(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        card = await booted(client)
        async with micctl_proc(state_dir, "events", "--kind", "state", "--kind", "app") as proc:
            assert proc.stdout is not None
            await subscribed(proc, client)
            await card.attach_block(state_dir / "hot.img", size="1M", create=True)
            await card.reset()
            lines = []
            async with asyncio.timeout(20):
                while not any(" ready " in ln for ln in lines):
                    lines.append((await proc.stdout.readline()).decode())
        assert any("mic0 resetting from=online cause=reset" in ln for ln in lines), lines
        assert not any("device_added" in ln for ln in lines)
    bad = await micctl(state_dir, "events", "--kind", "bogus")
    assert bad.rc == 2
    assert "unknown event kind 'bogus'" in bad.err


async def test_needs_reset_and_error_events(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        card = await booted(client)
        async with card.events(["device", "error"]) as evs:
            await card.run(app("corrupt_avail"), "vda", 1000)
            # the daemon's error log line comes first, then the device event
            err = await evs.wait_for("error", "mic0", timeout=10)
            assert "needs reset" in err.data["message"]
            ev = await evs.wait_for("device_needs_reset", "mic0", timeout=10, name="disk")
            assert "avail" in ev.data["reason"]
            # a filter that names no known kind is refused, naming it
            with pytest.raises(LocalProtocolError, match="unknown event kind 'nope'"):
                async with client.events(kinds=["nope"]):
                    pass
            with pytest.raises(MicTimeoutError, match=r"no online event of mic0 within 0\.3s"):
                await evs.wait_for("online", "mic0", timeout=0.3)


async def test_link_events_from_micctl_net(state_dir: Path) -> None:
    sw = f"sw{time.monotonic_ns() % 100000}"
    cfg = "version = 1\n\n" + net_card(
        "mic0", {"backend": "switch", "switch": sw, "card_mode": "frames"}
    )
    async with daemon(state_dir, cfg) as client:
        card = await booted(client)
        async with card.events(["net"]) as evs:
            r = await micctl(state_dir, "net", "mic0", "--link", "down")
            assert r.rc == 0, r.err
            ev = await evs.wait_for("link_down", "mic0", timeout=10)
            assert ev.data == {"name": "net0"}
            r = await micctl(state_dir, "net", "mic0", "--link", "up")
            assert r.rc == 0, r.err
            assert (await evs.wait_for("net", "mic0", timeout=10)).kind == "link_up"


async def test_slow_subscriber_loses_oldest_and_stalls_no_one(state_dir: Path) -> None:
    """A subscriber that stops reading: the daemon keeps serving, another
    subscriber gets every event in order, and the slow one, when it reads
    again, gets an ``events_lost`` marker and then the newest events."""
    async with daemon(state_dir) as client:
        card = await booted(client)
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(str(state_dir / "control.sock"))
        slow.sendall(b'{"id": 1, "op": "events", "card": "mic0", "kinds": ["app"], "buffer": 8}\n')
        f = slow.makefile("rb")  # buffered: the one reader of this socket
        ack = json.loads(f.readline())
        assert ack["result"] == {"card": "mic0", "kinds": ["app"], "buffer": 8}
        runs = 400
        async with client.events("mic0", ["app"], buffer=4096) as fast:
            worst = 0.0
            for i in range(0, runs, 20):
                await asyncio.gather(*(card.run(app("echo"), n) for n in range(i, i + 20)))
                t0 = time.monotonic()
                await client.ping()
                worst = max(worst, time.monotonic() - t0)
            seen = []
            async with asyncio.timeout(30):
                while len(seen) < 2 * runs:
                    ev = await fast.next_event()
                    assert ev is not None
                    seen.append(ev)
        assert worst < 2.0, f"the daemon answered a ping in {worst:.2f}s"
        assert not [e for e in seen if e.kind == "events_lost"]
        assert [e.seq for e in seen] == sorted(e.seq for e in seen)
        assert sum(e.kind == "app_ended" for e in seen) == runs

        # now the slow one reads: what it kept, a loss marker, the newest events
        slow.settimeout(10)
        items: list[dict[str, Any]] = []
        while not items or items[-1].get("seq") != seen[-1].seq:
            line = json.loads(f.readline())
            assert line["id"] == 1
            items.append(line["item"])
        slow.close()
        lost = [e for e in items if e["event"] == "events_lost"]
        assert sum(e["data"]["count"] for e in lost) > 0
        delivered = len(items) - len(lost)
        assert delivered + sum(e["data"]["count"] for e in lost) == 2 * runs
        # the marker stands where events are missing
        i = items.index(lost[-1])
        assert items[i + 1]["seq"] > items[i - 1]["seq"] + 1
        assert (await client.ping())["pid"]


async def test_events_stream_ends_when_left(state_dir: Path) -> None:
    """``async for`` alone: leaving the loop closes the stream's connection."""
    async with daemon(state_dir) as client:
        card = await booted(client)
        stream = client.events("mic0")
        task = asyncio.ensure_future(_first(stream))
        await asyncio.sleep(0.5)
        await card.run(app("echo"))
        ev = await asyncio.wait_for(task, 10)
        assert ev.kind == "app_started"
        await eventually(lambda: stream._conn is None, within=5, what="the stream closed")


async def _first(stream: EventStream) -> Event:
    async for ev in stream:
        return ev
    raise AssertionError("the stream ended")


# -- micctl logs ----------------------------------------------------------------------


async def _console_has(state_dir: Path, text: str) -> bool:
    path = state_dir / "mic0-console.log"
    return path.exists() and text.encode() in path.read_bytes()


async def test_micctl_logs_console_and_host(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        card = await booted(client)
        await card.run(app("console_write"), "hello from the card\n")
        await eventually(lambda: _console_has(state_dir, "hello from the card"), within=5,
                         what="console log")  # fmt: skip
        r = await micctl(state_dir, "logs", "mic0", "--console")
        assert r.rc == 0, r.err
        assert "hello from the card" in r.out
        assert "[host]" not in r.out
        r = await micctl(state_dir, "logs", "mic0", "--host", "-n", "200")
        assert r.rc == 0, r.err
        assert "mic0: state online" in r.out
        assert "hello from the card" not in r.out
        r = await micctl(state_dir, "logs", "mic0", "-n", "3")
        assert "hello from the card" in r.out
        assert len([ln for ln in r.out.splitlines() if ln.startswith("[host] ")]) == 3
        bad = await micctl(state_dir, "logs", "mic7")
        assert bad.rc == 1
        assert "unknown card 'mic7'" in bad.err
        bad = await micctl(state_dir, "logs", "mic0", "--console", "--device", "hvc9")
        assert bad.rc == 1
        assert "no console 'hvc9'" in bad.err


async def test_micctl_logs_follow_until_the_card_goes_down(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        card = await booted(client)
        async with micctl_proc(state_dir, "logs", "mic0", "--follow", "-n", "1") as proc:
            assert proc.stdout is not None
            async with asyncio.timeout(20):  # the recent host line: it is following
                while b"[host]" not in await proc.stdout.readline():
                    pass
            await card.run(app("console_write"), "followed line\n")
            await card.attach_block(state_dir / "f.img", size="1M", create=True)
            async with asyncio.timeout(20):
                out = b""
                while b"followed line" not in out:
                    out += await proc.stdout.readline()
            await card.shutdown(wait=True, timeout=30)
            async with asyncio.timeout(20):
                rest, err = await proc.communicate()
            assert proc.returncode == 0, err
        text = (out + rest).decode()
        assert "mic0: state shutting_down" in text
        assert "mic0: state ready" in text

        # a card that is down: --follow waits for it; Ctrl-C ends it with 130
        async with micctl_proc(state_dir, "logs", "mic0", "-f", "--host", "-n", "1") as proc:
            assert proc.stdout is not None
            async with asyncio.timeout(20):
                await proc.stdout.readline()
            await card.boot(wait=True, timeout=30)
            async with asyncio.timeout(20):
                while b"state online" not in await proc.stdout.readline():
                    pass
            proc.send_signal(signal.SIGINT)
            async with asyncio.timeout(10):
                assert await proc.wait() == 130


async def test_logs_from_the_client_library(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        await _client_logs(client)


async def _client_logs(client: Client) -> None:
    card = await booted(client)
    await card.run(app("console_write"), "from the library\n")
    await eventually(lambda: _console_has_client(card), within=5, what="console log")
    async with card.logs(source="console", lines=5) as logs:
        assert logs.info is not None
        assert logs.info["console_log"].endswith("mic0-console.log")
        items = [i async for i in logs]
    assert "from the library" in "".join(i["text"] for i in items)
    assert logs.end == {"reason": "done"}


async def _console_has_client(card: Any) -> bool:
    async with card.logs(source="console", lines=5) as logs:
        return "from the library" in "".join([i["text"] async for i in logs])


async def test_a_crash_is_an_event_with_the_reason(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        card = await booted(client)
        async with card.events(["state"]) as events:
            with pytest.raises(MicError):
                await card.run(app("suicide"))
            ev = await events.wait_for("crashed", timeout=10)
            assert (ev.data["from"], ev.data["cause"]) == ("online", "crash")
            assert ev.data["shutdown_status"] == "crashed"
            assert ev.data["error"]
            await card.boot(wait=False)  # a crashed card is reset, then boots
            assert (await events.wait_for("resetting", timeout=10)).data["from"] == "crashed"
            await events.wait_for("online", timeout=30)
