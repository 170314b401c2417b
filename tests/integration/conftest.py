"""Integration tests through real processes: ``mic-host`` daemons, ``mic-card`` card
OS processes and ``micctl``, started the way users start them (helpers in
:mod:`tests.integration.helpers`, card apps in :mod:`tests.integration.apps`).

Every test gets its own short state directory under ``/tmp`` (a Unix socket
path is limited to 107 bytes); when a test fails, the daemon's and cards' logs
from that directory are printed with its report.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.stash[_FAILED] = rep.failed
    return rep


@pytest.fixture
def state_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh, short state directory; on failure its logs are printed, then it is removed."""
    path = Path(tempfile.mkdtemp(prefix="mic", dir="/tmp"))
    try:
        yield path
    finally:
        if request.node.stash.get(_FAILED, False):
            for log in sorted(path.glob("*.log")):
                lines = log.read_text(errors="replace").splitlines()[-60:]
                print(f"--- {log.name} (tail) ---", *lines, sep="\n")
        shutil.rmtree(path, ignore_errors=True)
