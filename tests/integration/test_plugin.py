"""The ``mic_vop`` pytest plugin used the way a user's project uses it: its fixtures
(``mic_state_dir``, ``mic_config``, ``mic_daemon``, ``mic_card``) come from the
``pytest11`` entry point, not from a conftest here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mic_host.client import CardClient, Client, EventStream
from tests.integration.helpers import alive, app, block_toml, card_toml, config


def test_plugin_is_loaded_from_the_entry_point(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("mic_vop")
    assert plugin is not None
    assert plugin.__name__ == "mic_host.client.pytest_plugin"


@pytest.fixture
def mic_config() -> str:
    """Override of the plugin's fixture: a small card, booted at start, with two disks."""
    return config(
        card_toml(boot_at_start=True) + block_toml("{state_dir}/data.img", size="2M", name="data")
    )


@pytest.mark.asyncio
async def test_mic_card_runs_an_app(mic_card: CardClient, mic_state_dir: Path) -> None:
    st = await mic_card.status()
    assert st["state"] == "online"
    assert [d["device"] for d in st["devices"]] == ["hvc0", "vda", "vdb"]
    assert alive(st["pid"])
    assert (await mic_card.run(app("capacity"), "vdb"))["value"] == 4096
    await mic_card.run(app("write_text"), "vdb", 0, "from the plugin")
    assert (await mic_card.run(app("read_text"), "vdb", 0, 64))["value"] == "from the plugin"
    assert (mic_state_dir / "data.img").read_bytes()[:15] == b"from the plugin"
    assert len(os.fsencode(mic_state_dir / "control.sock")) <= 107


@pytest.mark.asyncio
async def test_mic_daemon_is_a_client(mic_daemon: Client, mic_state_dir: Path) -> None:
    ping = await mic_daemon.ping()
    assert ping["state_dir"] == str(mic_state_dir)
    card = mic_daemon.card("mic0")
    await card.wait("online", timeout=30)
    await card.shutdown(wait=True)
    assert (await card.status())["shutdown_status"] == "halted"


@pytest.mark.asyncio
async def test_mic_events_waits_for_an_event(mic_events: EventStream, mic_card: CardClient) -> None:
    await mic_card.shutdown(wait=False)
    ev = await mic_events.wait_for("ready", card="mic0", timeout=30)
    assert (ev.data["from"], ev.data["shutdown_status"]) == ("shutting_down", "halted")
    await mic_card.boot(wait=False)
    ev = await mic_events.wait_for("online", card="mic0", timeout=30)
    assert ev.data["from"] == "booting"
    assert min(ev.seq, ev.wall, ev.mono) > 0


def test_the_pytest_extra_brings_pytest_asyncio() -> None:
    """``pip install "mic-vop[pytest]"`` (README): the installed metadata declares it."""
    import importlib.metadata

    extra = [r for r in importlib.metadata.requires("mic-vop") or [] if 'extra == "pytest"' in r]
    assert any(r.startswith("pytest-asyncio") for r in extra), extra
