"""The ``mic_vop`` plugin's per-test configuration: the ``mic_config`` marker (this
module does not override the ``mic_config`` fixture, so the plugin's reads it)."""

from __future__ import annotations

import pytest

from mic_host.client import CardClient
from tests.integration.helpers import card_toml, config


@pytest.mark.asyncio
@pytest.mark.mic_config(config(card_toml(boot_at_start=True, disk=None)))
async def test_the_mic_config_marker_configures_the_card(mic_card: CardClient) -> None:
    assert [d["device"] for d in (await mic_card.status())["devices"]] == ["hvc0"]
    assert (await mic_card.run(f"{__name__}:who"))["value"] == "mic0"


@pytest.mark.asyncio
async def test_without_the_marker_the_embedded_default(mic_card: CardClient) -> None:
    assert [d["device"] for d in (await mic_card.status())["devices"]] == ["hvc0", "vda"]


async def who(card: object) -> str:
    """A card app in this test module: its code travels with the run."""
    return str(card.name)  # type: ignore[attr-defined]
