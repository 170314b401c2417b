"""The provider layer: priority order, fallback, entry points, direct extensions."""

from __future__ import annotations

import importlib.metadata
import zlib
from typing import Any

import pytest

from mic_card.accel import AccelFramework, NoProvider, ProviderRegistry, SessionSpec
from mic_card.accel.providers import ENTRY_POINT_GROUP
from mic_card.accel.providers.mic import MicProvider
from mic_card.accel.providers.soft import SoftProvider, SoftSession

pytestmark = pytest.mark.asyncio(loop_scope="module")


class Fake:
    def __init__(self, name: str, priority: int, algs: set[str], fail: bool = False) -> None:
        self.name, self.priority, self.algs, self.fail = name, priority, algs, fail
        self.opened: list[SessionSpec] = []

    def supports(self, alg: str) -> bool:
        return alg in self.algs

    async def open_session(self, spec: SessionSpec) -> Any:
        if self.fail:
            from mic_card.accel import QueueBusy

            raise QueueBusy("all queues busy")
        self.opened.append(spec)
        return SoftSession(spec)

    async def aclose(self) -> None:
        return None


async def test_selection_order_and_fallback() -> None:
    reg = ProviderRegistry()
    reg.register(SoftProvider())
    hi = Fake("hi", 200, {"zlib"}, fail=True)
    mid = Fake("mid", 50, {"zlib", "sha256"})
    reg.register(hi)
    reg.register(mid)
    assert [p.name for p in reg.candidates("zlib")] == ["hi", "mid", "soft"]
    assert reg.select("sha256").name == "mid"
    s = await reg.open_session("zlib", level=1)  # "hi" is busy: falls to "mid"
    assert mid.opened
    assert s.provider == "soft"
    s2 = await reg.open_session("aes-gcm", key=bytes(16), iv=bytes(12))
    assert isinstance(s2, SoftSession)  # only the software fallback offers it
    with pytest.raises(NoProvider):
        reg.select("rot13")
    with pytest.raises(NoProvider):
        await reg.open_session("zlib", provider="nope")


async def test_entry_points_are_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = importlib.metadata.EntryPoints(
        [
            importlib.metadata.EntryPoint(
                "soft2", "mic_card.accel.providers.soft:factory", ENTRY_POINT_GROUP
            ),
            importlib.metadata.EntryPoint("broken", "no.such.module:factory", ENTRY_POINT_GROUP),
        ]
    )
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group=None: eps.select(group=group)
    )
    reg = ProviderRegistry()
    assert reg.load_entry_points() == ["soft"]  # the factory's provider is named "soft"
    assert reg.names == ["soft"]


async def test_framework_prefers_hardware_and_soft_matches(fw: AccelFramework) -> None:
    data = b"provider layer " * 500
    hw = await fw.open_session("zlib", level=6)
    sw = await fw.open_session("zlib", level=6, provider="soft")
    assert hw.provider == "mic"
    assert sw.provider == "soft"
    assert bytes(await hw.do(data)) == bytes(await sw.do(data)) == zlib.compress(data, 6)
    assert fw.providers.names[:2] == ["mic", "soft"]
    # importing the provider directly gives its extensions: the shared queue pool
    mic = fw.providers.get("mic")
    assert isinstance(mic, MicProvider)
    qs = await mic.queues(fw.device("mic-zip"))
    assert qs
    assert all(q.state == "started" for q in qs)
    buf = qs[0].alloc(len(data))
    buf.view[:] = data
    s = await mic.open_session(SessionSpec("zlib", level=6), queues=qs[:1])
    assert zlib.decompress(bytes(await s.do(buf))) == data
    buf.free()
