"""The card OS's side of the control link: typed messages in, typed messages out.

Drives :meth:`CardOS._messages` and its app runner (:mod:`mic_card.apps`) with an in-memory
link (no processes): what the host sends is decoded with
``transport.messages.decode_from_host``; what does not decode is logged and
ignored; an app's error goes back as a ``WireError``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import types
from typing import Any

import pytest

from mic_card.apps import AppRunner
from mic_card.card import Card, CardOS
from transport.messages import RunResult, decode_from_card
from virtio.errors import LocalProtocolError, WireError


class FakeLink:
    def __init__(self, incoming: list[dict[str, Any]]) -> None:
        self.incoming = asyncio.Queue[dict[str, Any]]()
        for m in incoming:
            self.incoming.put_nowait(m)
        self.sent: list[dict[str, Any]] = []

    async def recv(self) -> dict[str, Any]:
        return await self.incoming.get()

    async def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)


def card_os(link: FakeLink) -> CardOS:
    """A CardOS with only what the link handling touches (no PCIe, no bus)."""
    os_ = CardOS.__new__(CardOS)
    os_.pcie = types.SimpleNamespace(link=link)  # type: ignore[assignment]
    os_.name = "mic0"
    os_.boot_params = {}
    os_.bus = types.SimpleNamespace(devices=lambda: [{"name": "vda"}])  # type: ignore[assignment]
    os_.shutdown_status = "halted"
    os_._stop = asyncio.Event()
    os_._apps = set()
    os_.card = Card(os_)
    os_.runner = AppRunner(os_.card, name="mic0", uptime=lambda: 1.0, reply=os_._reply)
    return os_


async def fail_app(card: Card, message: str) -> None:
    raise LocalProtocolError(message)


async def ok_app(card: Card) -> dict[str, Any]:
    return {"raw": b"\x01\xff", "pair": (1, 2.5), 3: None}


@pytest.mark.asyncio
async def test_undecodable_messages_are_logged_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = FakeLink(
        [
            {"type": "reboot-now"},  # unknown type
            {"type": "devices"},  # missing id
            {"type": "devices", "id": 4},
            {"type": "net-params", "id": 5, "net": [{"mac": "02:00:00:00:00:01"}]},
            {"type": "shutdown", "status": "poweroff"},
        ]
    )
    os_ = card_os(link)
    with caplog.at_level(logging.WARNING, logger="mic_card"):
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(os_._messages(tg))
            await asyncio.wait_for(os_._stop.wait(), 5)
            task.cancel()
    assert os_.shutdown_status == "poweroff"
    assert [decode_from_card(m) for m in link.sent] == [
        decode_from_card({"type": "devices", "id": 4, "devices": [{"name": "vda"}]}),
        decode_from_card({"type": "net-params", "id": 5}),
    ]
    assert os_.boot_params["net"] == [{"mac": "02:00:00:00:00:01"}]
    ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(ignored) == 2
    assert "reboot-now" in ignored[0]
    assert "lacks 'id'" in ignored[1]


@pytest.mark.asyncio
async def test_an_unknown_shutdown_status_halts() -> None:
    link = FakeLink([{"type": "shutdown", "status": "explode"}])
    os_ = card_os(link)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(os_._messages(tg))
        await asyncio.wait_for(os_._stop.wait(), 5)
        task.cancel()
    assert os_.shutdown_status == "halted"


@pytest.mark.asyncio
async def test_run_results_carry_the_value_or_a_wire_error() -> None:
    link = FakeLink([])
    os_ = card_os(link)
    async with asyncio.TaskGroup() as tg:  # apps without code: imported by name
        for rid, app, args in [
            (1, "tests.card.test_link_messages:fail_app", ["no disk"]),
            (2, "no_such_module_here:main", []),
            (None, "tests.card.test_link_messages:fail_app", ["boot app"]),
            (3, "tests.card.test_link_messages:ok_app", []),
        ]:
            os_.runner.start(tg, rid, app, args)
    results = [decode_from_card(m) for m in link.sent]
    # the app's own frames come back as its traceback; the loader's error has none
    first = results[0]
    assert isinstance(first, RunResult)
    assert first.traceback is not None
    assert "in fail_app" in first.traceback
    assert "LocalProtocolError: no disk" in first.traceback
    results[0] = dataclasses.replace(first, traceback=None)
    assert results == [
        RunResult(
            1,
            "tests.card.test_link_messages:fail_app",
            ok=False,
            error=WireError("LocalProtocolError", "LocalProtocolError", "no disk"),
        ),
        RunResult(
            2,
            "no_such_module_here:main",
            ok=False,
            error=WireError.from_exception(
                LocalProtocolError(
                    "app 'no_such_module_here:main': cannot import no_such_module_here: "
                    "No module named 'no_such_module_here'"
                )
            ),
        ),
        # a boot app (no id) reports nothing; results are made JSON-able
        RunResult(
            3,
            "tests.card.test_link_messages:ok_app",
            ok=True,
            result={"raw": "01ff", "pair": [1, 2.5], "3": None},
        ),
    ]
