"""The host end of the control link (mic_host.card.dispatch): replies matched to
requests (only of the expected type), every message typed, what the card makes us
log bounded by its log budget."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest

from mic_host.card.dispatch import CardLink, card_devices
from transport.link import MessageLink
from transport.messages import (
    CardMessage,
    DevicesReply,
    DevicesRequest,
    Heartbeat,
    NetParams,
    NetParamsReply,
    Run,
    RunResult,
    Shutdown,
    reply_type,
)
from virtio.errors import (
    BrokenResourceError,
    LocalProtocolError,
    MicTimeoutError,
    RemoteProtocolError,
)
from virtio.ratelimit import LogBudget

#: lines the card's budget allows per window in these tests
LINES = 10


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
    log = logging.getLogger("mic_host.card")
    budget = LogBudget("mic0", log, lambda: 0.0, lines=LINES)  # time stands still
    return fake, CardLink("mic0", cast(MessageLink, fake), budget.logger(log)), []


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
        for i in range(LINES + 5):
            fake.inbox.put_nowait({"type": "no such message", "n": i})
        # a malformed answer to the waiting request: it fails instead of waiting forever
        fake.inbox.put_nowait({"type": "devices", "id": 1, "devices": "nope"})
        with pytest.raises(RemoteProtocolError, match="list of objects"):
            await ask
    assert link.bad_messages == LINES + 6
    logged = [r for r in caplog.records if "bad message from card" in r.getMessage()]
    assert len(logged) == LINES
    assert seen == []
    # the link still works
    fake.inbox.put_nowait({"type": "heartbeat", "uptime": 2.0})
    await asyncio.sleep(0)
    assert seen == [Heartbeat(uptime=2.0)]
    serve.cancel()


@pytest.mark.asyncio
async def test_a_reply_completes_only_a_waiting_request_of_its_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, link, seen = _pair()
    serve = asyncio.create_task(link.serve(seen.append))
    run = asyncio.create_task(link.ask(lambda rid: Run(id=rid, app="m:f"), 5))
    net = asyncio.create_task(link.ask(lambda rid: NetParams(id=rid, net=[]), 5))
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="mic_host.card"):
        for forged in (
            {"type": "devices", "id": 1, "devices": [{"name": "vdz", "offset": 24}]},
            {"type": "net-params", "id": 1},  # right id, wrong type
            {"type": "run_result", "id": 2, "app": "m:f", "ok": True},
            {"type": "devices", "id": 77, "devices": []},  # nobody asked
        ):
            fake.inbox.put_nowait(forged)
        await asyncio.sleep(0)
    assert not run.done()
    assert not net.done()
    assert seen == []  # a forged devices list never reaches the session
    assert link.forged_replies == 4
    assert sum("ignored a" in r.getMessage() for r in caplog.records) == 4
    fake.inbox.put_nowait({"type": "net-params", "id": 2})
    fake.inbox.put_nowait({"type": "run_result", "id": 1, "app": "m:f", "ok": True})
    assert await net == NetParamsReply(id=2)
    assert await run == RunResult(id=1, app="m:f", ok=True)
    # an answer twice is forged the second time
    fake.inbox.put_nowait({"type": "net-params", "id": 2})
    fake.inbox.put_nowait({"type": "heartbeat", "uptime": 1.0})
    await asyncio.sleep(0)
    assert seen == [NetParamsReply(id=2), RunResult(id=1, app="m:f", ok=True), Heartbeat(1.0)]
    assert link.forged_replies == 5
    # a devices reply to a devices request is handed on (the session keeps the list)
    ask = asyncio.create_task(link.ask(lambda rid: DevicesRequest(id=rid), 5))
    await asyncio.sleep(0)
    fake.inbox.put_nowait({"type": "devices", "id": 3, "devices": []})
    assert await ask == DevicesReply(id=3, devices=[])
    assert seen[-1] == DevicesReply(id=3, devices=[])
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


def test_each_request_has_one_reply_type() -> None:
    assert reply_type(DevicesRequest(id=1)) is DevicesReply
    assert reply_type(Run(id=1, app="m:f")) is RunResult
    assert reply_type(NetParams(id=1, net=[])) is NetParamsReply
    with pytest.raises(LocalProtocolError, match="expects no reply"):
        reply_type(Shutdown())  # type: ignore[arg-type]
