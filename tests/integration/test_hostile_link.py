"""A hostile card on its control link, through real processes (issue 14, items 2, 5,
6 and 7): whatever it sends, only that card pays, the daemon's log stays
bounded, nothing it says completes a request it was not asked, nobody else can
reach a card's link, and ``reset`` + ``boot`` give a clean card again.

Card apps and a lying card OS: :mod:`tests.integration.hostile_link`.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from mic_host.client import CardClient
from mic_host.lifecycle import CardState
from tests.integration.helpers import alive, booted, card_toml, config, daemon, eventually
from virtio.errors import BrokenResourceError

HOSTILE = "tests.integration.hostile_link"


def hostile(fn: str) -> str:
    return f"{HOSTILE}:{fn}"


def _link_sockets(state_dir: Path) -> list[str]:
    """Card link sockets in the state directory (``mic0.sock``; not ``mic0-accel.sock``)."""
    return [p.name for p in state_dir.glob("mic[0-9].sock")]


def _daemon_log(state_dir: Path) -> list[str]:
    return (state_dir / "mic-host.log").read_text(errors="replace").splitlines()


async def _healthy(card: CardClient, name: str) -> None:
    st = await card.status()
    assert st["state"] == "online"
    assert (await card.run(hostile("garbage_messages"), 0))["value"] == 0
    assert st["name"] == name


@pytest.mark.asyncio
async def test_deeply_nested_frame_crashes_only_that_card_and_reset_boot_work(
    state_dir: Path,
) -> None:
    async with daemon(state_dir, config(card_toml("mic0"), card_toml("mic1"))) as client:
        card = await booted(client, "mic0")
        other = await booted(client, "mic1")
        with pytest.raises(BrokenResourceError):
            await card.run(hostile("nested_frame"), 200_000)
        await card.wait("crashed", timeout=10)
        st = await card.status()
        assert st["pid"] is None
        assert st["shutdown_status"] == "crashed"
        assert "link protocol" in st["last_error"]
        assert "nests JSON too deeply" in st["last_error"]
        # no link socket of the old boot is left behind (there never is one now)
        assert not _link_sockets(state_dir)
        await _healthy(other, "mic1")
        assert (await client.ping())["pid"]

        await card.reset()
        assert (await card.status())["state"] == "ready"
        await card.boot(wait=True, timeout=30)
        await _healthy(card, "mic0")
        await card.shutdown(wait=True, timeout=30)
        assert (await card.status())["shutdown_status"] == "halted"
        await _healthy(other, "mic1")


@pytest.mark.asyncio
async def test_duplicate_keys_are_not_taken_as_online(state_dir: Path) -> None:
    """A card OS whose first message is ``{"type": "heartbeat", "type": "online"}``."""
    liar = card_toml(
        "mic0",
        card_command=[sys.executable, "-m", HOSTILE, "dup-online"],
        boot_timeout=20,
    )
    async with daemon(state_dir, config(liar, card_toml("mic1"))) as client:
        other = await booted(client, "mic1")
        card = client.card("mic0")
        await card.boot(wait=False)
        await card.wait("crashed", timeout=15)
        st = await card.status()
        assert st["boot_seconds"] is None  # it never was online
        assert "duplicate key 'type'" in st["last_error"]
        assert not any("mic0: state online" in line for line in _daemon_log(state_dir))
        await _healthy(other, "mic1")


@pytest.mark.asyncio
async def test_a_card_cannot_forge_replies(state_dir: Path) -> None:
    async with daemon(state_dir) as client:
        card = await booted(client)
        # devices and net-params replies for every id the daemon may have in
        # flight, the run request carrying this very app among them
        names = (await card.run(hostile("forge_replies"), 200))["value"]
        assert names == ["hvc0", "vda"]  # the app ran, and its own answer came back
        st = await card.status()
        assert st["state"] == "online"
        assert [d["device"] for d in st["devices"]] == ["hvc0", "vda"]  # not evil0, evil1
        res = await card.attach("block", image=str(state_dir / "x.img"), size="1M", create=True)
        assert res["device"] == "vdb"
        forged = [line for line in _daemon_log(state_dir) if "ignored a" in line]
        assert 0 < len(forged) <= 20  # 400 forged replies, a bounded number of lines
        await card.shutdown(wait=True, timeout=30)


@pytest.mark.asyncio
async def test_a_garbage_flood_gives_a_bounded_log(state_dir: Path) -> None:
    """20,000 unknown messages: ignored (today's rule for well-framed garbage), a
    few log lines per second and a "suppressed N" summary instead of 20,000."""
    async with daemon(state_dir, config(card_toml("mic0"), card_toml("mic1"))) as client:
        card = await booted(client, "mic0")
        other = await booted(client, "mic1")
        before = len(_daemon_log(state_dir))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await card.run(hostile("garbage_messages"), 20_000))["value"] == 20_000
        took = loop.time() - t0

        def card_lines() -> list[str]:
            return [line for line in _daemon_log(state_dir)[before:] if "mic0" in line]

        def accounted() -> int:
            """Garbage messages logged, or counted in a "suppressed N" summary."""
            lines = card_lines()
            bad = sum("bad message from card" in line for line in lines)
            return bad + sum(
                int(line.split("suppressed ")[1].split()[0])
                for line in lines
                if "suppressed" in line
            )

        # every one of them is accounted for, once the last window's summary is out
        await eventually(lambda: accounted() >= 20_000, within=15, what="the summaries")
        await _healthy(card, "mic0")
        await _healthy(other, "mic1")
        lines = card_lines()
        # 10 lines a second and one summary per window: < 50 lines when the flood
        # takes the ~1-2 s it takes on an idle machine, more only on a loaded one
        budget = max(50, 11 * (int(took) + 2))
        assert len(lines) < budget, f"{took:.1f} s:\n" + "\n".join(lines[:60])
        assert any("mic0: suppressed" in line for line in lines)


@pytest.mark.asyncio
async def test_no_stranger_can_reach_a_card_link(state_dir: Path) -> None:
    """Another card's app spams the place a card's link used to listen while that
    card boots: there is nothing to connect to (the link is a socket pair the
    daemon handed to the card process), and the boot takes its usual time."""
    async with daemon(state_dir, config(card_toml("mic0"), card_toml("mic1"))) as client:
        other = await booted(client, "mic1")
        card = client.card("mic0")
        spam = asyncio.create_task(
            other.run(hostile("connect_spam"), str(state_dir / "mic0.sock"), 3.0)
        )
        await asyncio.sleep(0.3)
        await card.boot(wait=True, timeout=30)
        st = await card.status()
        assert st["boot_seconds"] < 2.5
        result = (await spam)["value"]
        assert result["tries"] > 100
        assert result["connected"] == 0
        assert not _link_sockets(state_dir)
        await _healthy(card, "mic0")


@pytest.mark.asyncio
async def test_any_exception_ends_the_session_as_a_crash(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug a card's message trips in the session (here: the handler raises
    TypeError on a heartbeat) ends that boot as a crash, with the reason, the card
    OS gone and the link closed; ``reset`` + ``boot`` then work. In-process card
    manager, real card OS process."""
    from mic_host.card.manager import CardManager
    from mic_host.card.session import BootSession
    from mic_host.config.schema import parse_config

    cfg = parse_config(config(card_toml("mic0", console=False, disk=None)), state_dir=state_dir)
    manager = CardManager(cfg.cards[0], state_dir=state_dir, node_id=1)
    original = BootSession._on_message
    tripped = False

    def on_message(self: BootSession, msg: object) -> None:
        nonlocal tripped
        if tripped is False and type(msg).__name__ == "Heartbeat":
            tripped = True
            raise TypeError("a bug a card message tripped")
        original(self, msg)  # type: ignore[arg-type]

    monkeypatch.setattr(BootSession, "_on_message", on_message)
    try:
        await manager.boot(wait=True, timeout=30)
        pid = manager.pid
        assert pid is not None
        await manager.wait_state(CardState.CRASHED, timeout=10)
        st = manager.status()
        assert st["pid"] is None
        assert "TypeError" in st["last_error"]
        assert "a bug a card message tripped" in st["last_error"]
        await eventually(lambda: not alive(pid), within=5, what="the card OS is gone")
        await manager.reset()
        await manager.boot(wait=True, timeout=30)
        assert manager.state is CardState.ONLINE
        await manager.shutdown(wait=True, timeout=30)
        assert manager.status()["shutdown_status"] == "halted"
    finally:
        await manager.aclose()
