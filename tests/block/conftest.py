"""Fixtures of the block tests: short state directories (logs printed on failure),
an in-process host+card rig, and a daemon running on a background loop for
Hypothesis tests across real processes."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio

import mic_host
from mic_host.client import Client
from tests.vop.rig import Rig

T = TypeVar("T")
_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.stash[_FAILED] = rep.failed
    return rep


def _dump_logs(path: Path) -> None:
    for log in sorted(path.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-60:]
        print(f"--- {log.name} (tail) ---", *lines, sep="\n")


@pytest.fixture
def state_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh, short state directory; on failure its logs are printed, then it is removed."""
    path = Path(tempfile.mkdtemp(prefix="mic", dir="/tmp"))
    try:
        yield path
    finally:
        if request.node.stash.get(_FAILED, False):
            _dump_logs(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig(config_timeout=2.0, remove_timeout=2.0, drain_timeout=2.0)
    try:
        yield r
    finally:
        await r.aclose()


class RemoteDaemon:
    """A daemon launched on a loop in a background thread, so synchronous
    (Hypothesis) tests can drive real processes: ``remote.call(coro_fn)``."""

    def __init__(self, config: str) -> None:
        self.state_dir = Path(tempfile.mkdtemp(prefix="mic", dir="/tmp"))
        self.config = config.replace("{dir}", str(self.state_dir))
        self.loop = asyncio.new_event_loop()
        self.client: Client | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("daemon thread did not start")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())
        self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with mic_host.launch(state_dir=self.state_dir, config=self.config) as client:
                self.client = client
                await client.card("mic0").wait("online", timeout=60)
                self._ready.set()
                await self._stop.wait()
        except BaseException as e:  # reported to the test thread
            self._error = e
            self._ready.set()

    def call(self, fn: Callable[[Client], Coroutine[Any, Any, T]], timeout: float = 60) -> T:
        assert self.client is not None
        fut = asyncio.run_coroutine_threadsafe(fn(self.client), self.loop)
        return fut.result(timeout)

    def close(self, failed: bool) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if failed:
            _dump_logs(self.state_dir)
        shutil.rmtree(self.state_dir, ignore_errors=True)
