"""The layering rule (STYLE.md §1): the virtio core imports neither asyncio nor the other layers."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import virtio

ROOT = Path(__file__).resolve().parents[2]
#: Every module of the package: a new one is checked without being listed here.
CORE = ["virtio", *(f"virtio.{m.name}" for m in pkgutil.iter_modules(virtio.__path__))]
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


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_asyncio_and_no_other_layer(module: str) -> None:
    mods = imported_by(module)
    assert module in mods
    assert "asyncio" not in mods
    assert not {m for m in mods if m.split(".")[0] in FORBIDDEN_PACKAGES}


def test_whole_core_together() -> None:
    mods = imported_by(*CORE)
    assert "asyncio" not in mods
    assert not {m for m in mods if m.split(".")[0] in FORBIDDEN_PACKAGES}


def test_probe_sees_asyncio_when_it_is_imported() -> None:
    """The probe itself works: importing asyncio does show up."""
    assert "asyncio" in imported_by("virtio", "asyncio")
