"""The ring model (:mod:`tests.virtio.ring_model`) on both ring formats.

One rule set, two machines: :data:`SPLIT` and :data:`PACKED` rings driven by
their driver and device queues over one memory and checked after every step
(FIFO avail order, out-of-order completions, tokens returned once with the
clamped length, descriptor/slot accounting, no lost wake-up either way). Every
stateful run starts with work on the ring (``WARM_UP``); the long runs start
empty and draw 30-80 operations, enough to wrap the small rings.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from tests.virtio.ring_model import PACKED, SPLIT, RingMachine, long_run, machine_for

SplitMachine = machine_for(SPLIT)
PackedMachine = machine_for(PACKED)

TestSplitMachine = SplitMachine.TestCase
TestSplitMachine.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPackedMachine = PackedMachine.TestCase
TestPackedMachine.settings = settings(TestSplitMachine.settings, max_examples=150)


@pytest.mark.parametrize("machine", [SplitMachine, PackedMachine], ids=["split", "packed"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_idx=st.booleans(), indirect=st.booleans(), data=st.data())
def test_model_long_runs(
    machine: type[RingMachine], event_idx: bool, indirect: bool, data: st.DataObject
) -> None:
    size = data.draw(st.sampled_from(machine.KIND.sizes), label="size")
    long_run(machine, size, event_idx, indirect, data)
