"""The event bus and its bounded feeds, without processes (the daemon's side is
in tests/integration/test_events.py): filters, drop-oldest with a loss marker,
the QMP-shaped wire form and its parse."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from mic_host.events import MAX_FEED, Event, EventBus, Feed, card_context, emit, installed


def clock() -> tuple[float, float]:
    return 1_700_000_000.25, 42.5


def test_publish_filters_by_card_and_kind_or_category() -> None:
    bus = EventBus(clock)
    with (
        bus.subscribe() as every,
        bus.subscribe(card="mic0") as mic0,
        bus.subscribe(kinds=["state", "link_up"]) as some,
    ):
        bus.publish("online", "mic0", **{"from": "booting"})
        bus.publish("device_added", "mic1", name="disk")
        bus.publish("link_up", "mic1", name="net0")
        bus.publish("error", None, message="daemon-wide")
        assert [e.kind for e in every._queue] == ["online", "device_added", "link_up", "error"]
        assert [e.kind for e in mic0._queue] == ["online", "error"]  # daemon-wide ones too
        assert [e.kind for e in some._queue] == ["online", "link_up"]
        assert [e.seq for e in every._queue] == [1, 2, 3, 4]
    assert bus.subscribers == 0
    bus.publish("online", "mic0")  # nobody listening: nothing held


def test_a_full_feed_drops_the_oldest_and_reports_the_loss_first() -> None:
    bus = EventBus(clock)
    with bus.subscribe(maxlen=3) as feed:
        for i in range(10):
            bus.publish("app_started", "mic0", run=i)
        assert len(feed) == 3
        marker = feed.get_nowait()
        assert marker is not None
        assert (marker.kind, marker.data) == ("events_lost", {"count": 7})
        kept = [feed.get_nowait() for _ in range(3)]
        assert [e.data["run"] for e in kept if e is not None] == [7, 8, 9]
        assert feed.get_nowait() is None
        assert feed.lost_total == 7


@pytest.mark.asyncio
async def test_get_waits_for_the_next_event() -> None:
    bus = EventBus(clock)
    with bus.subscribe() as feed:
        waiter = asyncio.ensure_future(feed.get())
        await asyncio.sleep(0)
        assert not waiter.done()
        bus.publish("ready", "mic0")
        assert (await asyncio.wait_for(waiter, 1)).kind == "ready"


def test_feed_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="1 to 4096"):
        Feed(maxlen=0)
    with pytest.raises(ValueError, match="1 to 4096"):
        Feed(maxlen=MAX_FEED + 1)


def test_emit_goes_to_the_installed_bus_with_the_current_card() -> None:
    emit("link_up", name="net0")  # none installed: nothing happens
    bus = EventBus(clock)
    with installed(bus), bus.subscribe() as feed:
        with card_context("mic3"):
            emit("link_down", name="net0")
        emit("link_up", "mic1", name="net0")
        emit("error", message="x")
    got = [(e.kind, e.card) for e in itertools.islice(feed._queue, None)]
    assert got == [("link_down", "mic3"), ("link_up", "mic1"), ("error", None)]


def test_wire_form_is_qmp_shaped_and_round_trips() -> None:
    ev = Event("online", "mic0", {"from": "booting"}, 1_700_000_000.25, 42.5, 7)
    obj = ev.to_wire()
    assert obj["event"] == "online"
    assert obj["timestamp"] == {"seconds": 1_700_000_000, "microseconds": 250000}
    assert obj["time"] == "2023-11-14T22:13:20.250000+00:00"
    assert (obj["monotonic"], obj["seq"], obj["card"]) == (42.5, 7, "mic0")
    assert Event.from_wire(obj) == ev
    assert ev.category == "state"
    assert "mic0 online from=booting" in ev.describe()
    for bad in ({}, {"event": 3}, {"event": "x", "card": 5}, {"event": "x", "seq": []}):
        with pytest.raises(ValueError):
            Event.from_wire(bad)
