"""Importing the virtio core loads no asyncio, checked at run time (STYLE.md §1).

The layering rules themselves (virtio imports nothing of the project above it
and none of the modules of :data:`tests.layering.rules.VIRTIO_FORBIDDEN`,
counting every import) are checked statically in :mod:`tests.layering`. This
one run-time check stays because it also sees what a third-party import
(construct) pulls in behind the core's back.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import virtio

ROOT = Path(__file__).resolve().parents[2]
#: every module of the core, sub-packages' modules included: a new one is checked unlisted
CORE = ["virtio", *(m.name for m in pkgutil.walk_packages(virtio.__path__, "virtio."))]
FORBIDDEN_PACKAGES = {"transport", "mic_host", "mic_card"}

PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def imported_by(*modules: str) -> set[str]:
    """The modules a fresh interpreter holds after importing ``modules``."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(json.loads(out.stdout))


def test_importing_every_virtio_module_loads_no_asyncio_and_no_other_layer() -> None:
    assert {"virtio.split", "virtio.errors", "virtio.status"} <= set(CORE)
    mods = imported_by(*CORE)
    assert set(CORE) <= mods
    assert "asyncio" not in mods
    assert not {m for m in mods if m.split(".")[0] in FORBIDDEN_PACKAGES}


def test_the_probe_sees_asyncio_when_it_is_imported() -> None:
    assert "asyncio" in imported_by("virtio", "asyncio")
