"""The accelerators reached from the card OS: ``accel`` in the card shell, through
real mic-host / mic-card processes (the framework starts on first use)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import mic_host
from mic_host.client import CardClient

CONFIG = """\
version = 1
[[cards]]
name = "mic0"
boot_at_start = true
card_ram = "16M"
host_ram = "4M"
[[cards.devices]]
type = "console"
"""


@pytest_asyncio.fixture
async def card() -> AsyncIterator[CardClient]:
    d = tempfile.mkdtemp(prefix="mic", dir="/tmp")
    try:
        async with mic_host.launch(state_dir=d, config=CONFIG) as client:
            c = client.card("mic0")
            await c.wait("online", timeout=30)
            yield c
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.asyncio
async def test_accel_list_and_bench_in_the_card_shell(card: CardClient) -> None:
    out, err, status = await card.exec("accel", "list", timeout=60)
    assert status == 0, err
    text = out.decode()
    assert "mic-zip" in text
    assert "mic-sec" in text
    assert "algorithms: deflate zlib gzip" in text

    args = ("--alg", "zlib", "--size", "4096", "--seconds", "0.3", "--batch", "4", "--json")
    out, err, status = await card.exec("accel", "bench", *args, timeout=60)
    assert status == 0, err
    result = json.loads(out)
    assert (result["alg"], result["length"], result["errors"]) == ("zlib", 4096, 0)
    assert result["requests"] > 0

    _, err, status = await card.exec("accel", "frobnicate")
    assert status == 2
    assert b"usage: accel" in err
