"""The per-hop trace: off and free by default; the breakdown of merged marks."""

from __future__ import annotations

import gc
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


def test_marks_give_the_cyclic_gc_nothing_to_count() -> None:
    # A traced request must not make the collector run (its pauses would be
    # blamed on the hops): a mark allocates no object the GC tracks.
    ticks = itertools.count(1000, 10)
    was = gc.isenabled()
    gc.disable()
    try:
        trace.enable(lambda: next(ticks))
        before = gc.get_count()[0]
        for _ in range(10_000):
            trace.mark(trace.SUBMIT)
        assert gc.get_count()[0] - before < 100
        assert len(trace.records()) == 10_000
    finally:
        trace.disable()
        if was:
            gc.enable()


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
