"""pytest plugin ``mic_vop``: fixtures that run a real mic-host daemon for a test.

Registered through the ``pytest11`` entry point, so installing
``mic-vop[pytest]`` (which brings pytest-asyncio) makes these fixtures
available in any project (README's quick start, ``docs/cli.md``):

- ``mic_state_dir``: a fresh state directory (short enough for a Unix socket);
- ``mic_config``: the config the daemon starts with: the TOML text or path of
  the test's ``@pytest.mark.mic_config(...)`` marker, else ``None`` (the
  embedded default: ``mic0`` with a console and a 64 MiB disk, booted at
  start). A ``conftest.py`` or test module may also override the fixture;
- ``mic_daemon``: a :class:`~mic_host.client.Client` connected to a daemon
  launched for the test and stopped after it;
- ``mic_card``: the ``mic0`` :class:`~mic_host.client.CardClient`, online.
  ``await mic_card.run("apps:main")`` runs ``async def main(card)`` of the
  project's ``apps.py`` (found as ``python -m`` would, or ``path/to/file.py:main``);
  its code is sent to the card for that run (:mod:`mic_host.client.apps`).
- ``mic_events``: the daemon's events from the moment the fixture is set up
  (a :class:`~mic_host.client.EventStream`): ``ev = await
  mic_events.wait_for("online", card="mic0", timeout=30)`` returns the first
  matching event after the last one it returned, instead of polling ``status``.

The fixtures are async (pytest-asyncio, function scope). Without
pytest-asyncio installed the plugin still loads (it must never break a
user's pytest) and the async fixtures fail with an explanation.

Part of the client library: imports pytest, the client and ``mic_host.paths``;
never the daemon side (the daemon runs as a child process).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mic_host.client.connection import CardClient, Client
from mic_host.client.events import EventStream
from mic_host.client.launch import launch
from mic_host.lifecycle import CardState
from mic_host.paths import SOCKET_NAME

__all__ = [
    "mic_card",
    "mic_config",
    "mic_daemon",
    "mic_events",
    "mic_state_dir",
    "pytest_configure",
]

#: Seconds the fixtures allow the daemon to start and the card to come online.
STARTUP_TIMEOUT = 30.0
ONLINE_TIMEOUT = 60.0
#: Leave room under the 107-byte sun_path limit.
_SOCKET_PATH_ROOM = 100
_HAVE_PYTEST_ASYNCIO = importlib.util.find_spec("pytest_asyncio") is not None


@pytest.fixture
def mic_state_dir(tmp_path: Path) -> Iterator[Path]:
    """A new, empty state directory for one test.

    ``tmp_path/mic`` when its socket path fits in a Unix socket address,
    else a short directory under the system temp dir, removed afterwards.
    """
    candidate = tmp_path / "mic"
    if len(os.fsencode(candidate / SOCKET_NAME)) <= _SOCKET_PATH_ROOM:
        candidate.mkdir(mode=0o700)
        yield candidate
        return
    short = Path(tempfile.mkdtemp(prefix="mic-"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "mic_config(config): the mic-host config of this test's mic_daemon/mic_card "
        "(TOML text, or a pathlib.Path to a TOML file)",
    )


@pytest.fixture
def mic_config(request: pytest.FixtureRequest) -> str | os.PathLike[str] | None:
    """The daemon's config for ``mic_daemon``: the test's ``mic_config`` marker (TOML
    text or a :class:`~pathlib.Path`), else None (the embedded default). Or override me."""
    marker = request.node.get_closest_marker("mic_config")
    if marker is None:
        return None
    if len(marker.args) != 1 or marker.kwargs or not isinstance(marker.args[0], str | Path):
        pytest.fail("@pytest.mark.mic_config takes one argument: TOML text or a pathlib.Path")
    value: str | Path = marker.args[0]
    return value


if TYPE_CHECKING or _HAVE_PYTEST_ASYNCIO:
    import pytest_asyncio

    @pytest_asyncio.fixture
    async def mic_daemon(
        mic_state_dir: Path, mic_config: str | os.PathLike[str] | None
    ) -> AsyncIterator[Client]:
        """A daemon launched in ``mic_state_dir`` with ``mic_config``; stopped after the test."""
        async with launch(mic_state_dir, mic_config, startup_timeout=STARTUP_TIMEOUT) as client:
            yield client

    @pytest_asyncio.fixture
    async def mic_card(mic_daemon: Client) -> CardClient:
        """Card ``mic0``, online (booted here if the config does not boot it at start)."""
        card = mic_daemon.card("mic0")
        if await card.state() is CardState.READY:
            await card.boot(wait=True, timeout=ONLINE_TIMEOUT)
        else:
            await card.wait(CardState.ONLINE, timeout=ONLINE_TIMEOUT)
        return card

    @pytest_asyncio.fixture
    async def mic_events(mic_daemon: Client) -> AsyncIterator[EventStream]:
        """The daemon's events (every card) from now on: ``await mic_events.wait_for(
        "online", card="mic0", timeout=30)``; see :meth:`EventStream.wait_for`."""
        async with mic_daemon.events() as events:
            yield events

else:  # pragma: no cover - depends on the environment

    @pytest.fixture
    def mic_daemon() -> None:
        """Needs pytest-asyncio."""
        pytest.fail("the mic_vop fixtures need pytest-asyncio: pip install 'mic-vop[pytest]'")

    @pytest.fixture
    def mic_card() -> None:
        """Needs pytest-asyncio."""
        pytest.fail("the mic_vop fixtures need pytest-asyncio: pip install 'mic-vop[pytest]'")

    @pytest.fixture
    def mic_events() -> None:
        """Needs pytest-asyncio."""
        pytest.fail("the mic_vop fixtures need pytest-asyncio: pip install 'mic-vop[pytest]'")
