"""Card driver plug-ins through real processes: a ``mic-card`` whose environment
holds ``mic_vop.drivers`` entry points: one that outranks the built-in
virtio-blk driver, one whose module does not exist or fails to import, one
whose driver raises while probing (the device is listed failed).

The plug-ins are real installed distributions (a ``.dist-info`` and a module)
in a folder the card OS gets on its ``PYTHONPATH`` through ``card_command``;
the fresh-venv test of ``examples/virtio-rng`` installs one with pip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.card.plugin_dist import make_dist
from tests.integration.helpers import app, booted, card_toml, config, daemon, micctl

DRIVERS_APP = "tests.integration.plugin_apps:bound_drivers"
BIND_APP = "tests.integration.plugin_apps:bind"

TRACED = """
from mic_card.drivers import BlockDevice


class TracedBlock(BlockDevice):
    \"\"\"The built-in virtio-blk driver under another name, outranking it.\"\"\"

    DEVICE_TYPE = 2
    PRIORITY = 10
"""


@pytest.mark.asyncio
async def test_plugin_outranks_builtin_and_a_broken_one_is_logged(
    state_dir: Path, tmp_path: Path
) -> None:
    plugins = make_dist(
        tmp_path / "site",
        "traced-blk",
        {"traced-blk": "traced_blk:TracedBlock", "broken-blk": "no_such_module:Driver"},
        {"traced_blk": TRACED},
    )
    # The card OS gets the plug-ins' folder on its path; the daemon appends
    # "python -m mic_card --link-fd N --card mic0".
    card = card_toml(card_command=["env", f"PYTHONPATH={plugins}"])
    async with daemon(state_dir, config(card)) as client:
        mic0 = await booted(client)
        drivers = (await mic0.run(DRIVERS_APP))["value"]
        assert drivers == {
            "hvc0": ["virtio-console", "ConsoleDevice"],
            "vda": ["traced-blk", "TracedBlock"],
        }
        # the plug-in driver does real I/O
        await mic0.run(app("write_text"), "vda", 3, "through a plug-in")
        assert (await mic0.run(app("read_text"), "vda", 3, 64))["value"] == "through a plug-in"
        assert (state_dir / "mic0.img").read_bytes()[3 * 512 : 3 * 512 + 17] == b"through a plug-in"

    log = (state_dir / "mic0-card.log").read_text()
    assert "card driver plug-in 'broken-blk' (entry point no_such_module:Driver" in log
    assert "failed to load: ModuleNotFoundError: No module named 'no_such_module'; skipped" in log
    assert (
        "device type 2: driver 'traced-blk' (priority 10, plug-in traced-blk) serves; "
        "also claimed by 'virtio-blk' (priority 0, built-in)" in log
    )


@pytest.mark.asyncio
async def test_broken_plugin_leaves_the_builtin_serving(state_dir: Path, tmp_path: Path) -> None:
    plugins = make_dist(
        tmp_path / "site",
        "broken-blk",
        {"broken-blk": "broken_blk:Driver"},
        {"broken_blk": "raise ImportError('needs libfoo.so')\n"},
    )
    card = card_toml(card_command=["env", f"PYTHONPATH={plugins}"])
    async with daemon(state_dir, config(card)) as client:
        mic0 = await booted(client)
        drivers = (await mic0.run(DRIVERS_APP))["value"]
        assert drivers == {
            "hvc0": ["virtio-console", "ConsoleDevice"],
            "vda": ["virtio-blk", "BlockDevice"],
        }
        await mic0.run(app("write_text"), "vda", 0, "built-in")
        assert (await mic0.run(app("read_text"), "vda", 0, 64))["value"] == "built-in"
    log = (state_dir / "mic0-card.log").read_text()
    assert "card driver plug-in 'broken-blk'" in log
    assert "failed to load: ImportError: needs libfoo.so; skipped" in log


RAISING = """
class RaisingBlock:
    \"\"\"Outranks the built-in virtio-blk driver, and its constructor raises.\"\"\"

    DEVICE_TYPE = 2
    FEATURES = 0
    PRIORITY = 5

    def __init__(self, dev):
        raise RuntimeError("no DMA engine on this card")
"""

RAISED = "driver raising-blk raised RuntimeError: no DMA engine on this card"


@pytest.mark.asyncio
async def test_plugin_whose_driver_raises_marks_the_device_failed(
    state_dir: Path, tmp_path: Path
) -> None:
    plugins = make_dist(
        tmp_path / "site",
        "raising-blk",
        {"raising-blk": "raising_blk:RaisingBlock"},
        {"raising_blk": RAISING},
    )
    card = card_toml(card_command=["env", f"PYTHONPATH={plugins}"])
    async with daemon(state_dir, config(card)) as client:
        mic0 = await booted(client)
        # the device is listed failed with the driver's error, on the card ...
        drivers = (await mic0.run(DRIVERS_APP))["value"]
        assert drivers == {"hvc0": ["virtio-console", "ConsoleDevice"], "vda": [None, None]}
        # ... through the client library and micctl devices
        rows = {r["device"]: r for r in await mic0.devices()}
        assert (rows["vda"]["state"], rows["vda"]["driver"]) == ("failed", None)
        assert rows["vda"]["error"] == RAISED
        assert (rows["hvc0"]["state"], rows["hvc0"]["driver"]) == ("live", "virtio-console")
        done = await micctl(state_dir, "devices", "mic0")
        assert done.rc == 0, done.err
        vda = next(ln for ln in done.out.splitlines() if ln.startswith("vda"))
        assert vda.split()[:5] == ["vda", "disk", "block", "-", "failed"]
        assert RAISED in vda
        # the card and its other devices carry on: the shell answers on the console
        out, err, status = await mic0.exec("echo", "still", "here")
        assert (status, out) == (0, b"still here\n"), err
        assert await mic0.state() == "online"
        # and the built-in driver, still in the table by name, can take the device over
        assert (await mic0.run(BIND_APP, "vda", "virtio-blk"))["value"] == "BlockDevice"
        await mic0.run(app("write_text"), "vda", 5, "after the plug-in failed")
        assert (await mic0.run(app("read_text"), "vda", 5, 64))["value"] == (
            "after the plug-in failed"
        )
    log = (state_dir / "mic0-card.log").read_text()
    assert "probe of vda (type 2 at 0x" in log
    assert f"by raising-blk failed: {RAISED}" in log
