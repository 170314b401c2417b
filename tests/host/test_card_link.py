"""The host end of the control link (mic_host.card.dispatch): replies matched to
requests, every message typed, bad frames logged a bounded number of times."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest

from mic_host.card.dispatch import MAX_BAD_MESSAGE_LOGS, CardLink, card_devices
from transport.link import MessageLink
from transport.messages import (
    CardMessage,
    DevicesReply,
    DevicesRequest,
    Heartbeat,
    Run,
    RunResult,
)
from virtio.errors import BrokenResourceError, MicTimeoutError, RemoteProtocolError


class FakeLink:
    """Frames in a queue; what the host sent in a list; EOF raises BrokenResourceError."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []

    async def send(self, obj: dict[str, Any]) -> None:
        self.sent.append(obj)

    async def recv(self) -> dict[str, Any]:
        obj = await self.inbox.get()
        if obj is None:
            raise BrokenResourceError("link lost")
        return obj


def _pair() -> tuple[FakeLink, CardLink, list[CardMessage]]:
    fake = FakeLink()
    return fake, CardLink("mic0", cast(MessageLink, fake)), []


@pytest.mark.asyncio
async def test_replies_go_to_their_request_and_every_message_to_the_handler() -> None:
    fake, link, seen = _pair()
    serve = asyncio.create_task(link.serve(seen.append))
    ask = asyncio.create_task(link.ask(lambda rid: Run(id=rid, app="m:f", args=[1]), 5))
    await asyncio.sleep(0)
    assert fake.sent == [{"type": "run", "id": 1, "app": "m:f", "args": [1]}]
    fake.inbox.put_nowait({"type": "heartbeat", "uptime": 1.0})
    fake.inbox.put_nowait({"type": "run_result", "id": 1, "app": "m:f", "ok": True, "result": 7})
    reply = await ask
    assert reply == RunResult(id=1, app="m:f", ok=True, result=7)
    assert seen == [Heartbeat(uptime=1.0), reply]
    fake.inbox.put_nowait(None)
    with pytest.raises(BrokenResourceError):
        await serve


@pytest.mark.asyncio
async def test_bad_frames_are_logged_bounded_and_fail_the_request_they_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, link, seen = _pair()
    serve = asyncio.create_task(link.serve(seen.append))
    ask = asyncio.create_task(link.ask(lambda rid: DevicesRequest(id=rid), 5))
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="mic_host.card"):
        for i in range(MAX_BAD_MESSAGE_LOGS + 5):
            fake.inbox.put_nowait({"type": "no such message", "n": i})
        # a malformed answer to the waiting request: it fails instead of waiting forever
        fake.inbox.put_nowait({"type": "devices", "id": 1, "devices": "nope"})
        with pytest.raises(RemoteProtocolError, match="list of objects"):
            await ask
    assert link.bad_messages == MAX_BAD_MESSAGE_LOGS + 6
    logged = [r for r in caplog.records if "bad message from card" in r.getMessage()]
    assert len(logged) == MAX_BAD_MESSAGE_LOGS
    assert any("not logged" in r.getMessage() for r in caplog.records)
    assert seen == []
    # the link still works
    fake.inbox.put_nowait({"type": "devices", "id": 99, "devices": []})
    await asyncio.sleep(0)
    assert seen == [DevicesReply(id=99, devices=[])]
    serve.cancel()


@pytest.mark.asyncio
async def test_no_answer_times_out_and_a_lost_boot_fails_the_waiters() -> None:
    _fake, link, _seen = _pair()
    with pytest.raises(MicTimeoutError, match="no answer to devices"):
        await link.ask(lambda rid: DevicesRequest(id=rid), 0.01)
    ask = asyncio.create_task(link.ask(lambda rid: DevicesRequest(id=rid), 5))
    await asyncio.sleep(0)
    link.fail_replies(BrokenResourceError("mic0 is down"))
    with pytest.raises(BrokenResourceError, match="down"):
        await ask


def test_card_devices_keeps_only_well_formed_entries() -> None:
    raw: list[dict[str, Any]] = [
        {"name": "vda", "offset": 24},
        {"name": 5, "offset": 1},
        {"name": "x", "offset": True},
        {"offset": 3},
    ]
    assert card_devices(raw) == [{"name": "vda", "offset": 24}]
