"""The per-hop trace: off and free by default; the breakdown of merged marks."""

from __future__ import annotations

import itertools

from virtio import trace


def test_off_by_default() -> None:
    assert trace.ON is False
    assert trace.records() == []


def test_enable_records_with_the_given_clock_and_disable_stops() -> None:
    ticks = itertools.count(1000, 10)
    try:
        trace.enable(lambda: next(ticks), capacity=3)
        assert trace.ON
        for hop in (trace.SUBMIT, trace.DOORBELL, trace.POP, trace.PUSH):
            trace.mark(hop)
        assert trace.records() == [(0, 1000), (1, 1010), (3, 1020)]  # capacity bounds it
    finally:
        trace.disable()
    assert trace.ON is False


def test_breakdown_merges_processes_and_orders_steps() -> None:
    card = []
    host = []
    for i in range(5):
        t = i * 1_000_000
        card += [(trace.SUBMIT, t), (trace.DOORBELL, t + 4_000), (trace.CARD_IRQ, t + 60_000),
                 (trace.COMPLETE, t + 65_000)]  # fmt: skip
        host += [(trace.HOST_WAKE, t + 10_000), (trace.POP, t + 20_000),
                 (trace.PUSH, t + 30_000), (trace.INTERRUPT, t + 35_000)]  # fmt: skip
    b = trace.breakdown(host + card)  # any order: merged by time
    assert b["episodes"] == 4  # the last one may be incomplete: left out
    steps = [(s["step"], s["p50_us"]) for s in b["steps"]]  # type: ignore[attr-defined]
    assert steps == [
        ("submit -> doorbell", 4.0),
        ("doorbell -> host_wake", 6.0),
        ("host_wake -> pop", 10.0),
        ("pop -> push", 10.0),
        ("push -> interrupt", 5.0),
        ("interrupt -> card_irq", 25.0),
        ("card_irq -> complete", 5.0),
    ]
    assert b["episode_p50_us"] == 65.0
