"""The event loop of ``mic-host`` and its cards: ``MIC_EVENT_LOOP`` / ``--event-loop``
(``transport/eventloop.py``), through real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mic_host

CONFIG = """
[[cards]]
name = "mic0"
boot_at_start = true

[[cards.devices]]
type = "block"
options = {{ image = "{img}" }}
"""


def _maps_uvloop(pid: int) -> bool:
    return "uvloop" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.asyncio
@pytest.mark.parametrize("loop", ["uvloop", "asyncio", "spin"])
async def test_daemon_and_card_run_on_the_loop_asked_for(state_dir: Path, loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    img = state_dir / "disk.img"
    img.write_bytes(b"\xab" * (1 << 20))
    env = {"MIC_EVENT_LOOP": loop}
    async with mic_host.launch(state_dir, CONFIG.format(img=img), env=env) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=30)
        # the block path works end to end on it (a request and its answer)
        info = (await card.run("tests.block.apps:info", "vda"))["value"]
        assert info["capacity"] == 2048
        daemon_pid = int((await client.ping())["pid"])
        card_pid = int((await card.status())["pid"])
        assert _maps_uvloop(daemon_pid) is (loop == "uvloop")
        assert _maps_uvloop(card_pid) is (loop == "uvloop")


def test_mic_host_refuses_an_unknown_event_loop(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "mic_host.daemon", "--state-dir", str(tmp_path), "--event-loop",
         "tokio"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 2
    assert "--event-loop" in r.stderr
    assert "tokio" in r.stderr
