"""The daemon and its cards run the compiled ring core when ``make install`` built it.

Both import ``virtio`` from this tree (the card through the ``PYTHONPATH``
the daemon gives it), so both must map the mypyc shared library
(``virtio/_ringcore__mypyc...so``, ``tools/mypyc_build.py``) and the module
of their side of the ring; checked in
``/proc/PID/maps`` of the real processes after a block request went
through the rings.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

import pytest

import mic_host
from bench import config as bench_config
from tools import mypyc_build, pure_python


def _config(image: Path) -> str:
    return bench_config.card(bench_config.block(image), card_ram=None, heartbeat_timeout=None)


def _maps(pid: int, module: str) -> bool:
    """Does process ``pid`` map the compiled ``module`` (``virtio/split/device``)?"""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return f"{module}{suffix}" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.asyncio
async def test_daemon_and_card_run_the_compiled_ring_core(state_dir: Path) -> None:
    if pure_python.pure_requested() or not mypyc_build.built_files():
        pytest.skip("the ring core is not built here (pure Python)")
    img = state_dir / "disk.img"
    img.write_bytes(b"\xab" * (1 << 20))
    async with mic_host.launch(state_dir, _config(img)) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=30)
        info = (await card.run("tests.block.apps:info", "vda"))["value"]
        assert info["capacity"] == 2048
        daemon_pid = int((await client.ping())["pid"])
        card_pid = int((await card.status())["pid"])
        # the host serves the device side, the card drives the driver side
        for pid, who in ((daemon_pid, "daemon"), (card_pid, "card")):
            assert _maps(pid, "virtio/_ringcore__mypyc"), f"the {who} runs pure Python"
        assert _maps(daemon_pid, "virtio/split/device"), "the daemon's device side is not compiled"
        assert _maps(card_pid, "virtio/split/driver"), "the card's driver side is not compiled"
