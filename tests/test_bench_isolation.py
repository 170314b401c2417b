"""``bench/isolation.py``'s own parts: the latency histogram and the hostile card's priority."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bench import isolation


def test_histogram_percentiles_are_within_half_a_percent() -> None:
    rng = random.Random(19)
    samples = [rng.lognormvariate(-2.5, 1.0) for _ in range(50_000)] + [0.0, 1e-9, 250.0]
    hist: dict[int, int] = {}
    for ms in samples:
        key = isolation.hist_key(ms)
        hist[key] = hist.get(key, 0) + 1
    assert len(hist) < 5000  # a few KB of JSON whatever the number of operations
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = isolation.percentile(samples, q)
        assert abs(isolation.hist_percentile(hist, q) / exact - 1) <= 0.005, q
    assert isolation.hist_percentile({}, 0.5) != isolation.hist_percentile({}, 0.5)  # NaN


def test_lower_priority_lowers_the_process_and_its_session_group() -> None:
    """A card OS runs in a session of its own (its own autogroup): its nice value
    alone would rank it only inside that group, so the group's is lowered too."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        isolation.lower_priority(child.pid, 19)
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == 19
        group = Path(f"/proc/{child.pid}/autogroup")
        if not Path("/proc/self/autogroup").exists():
            pytest.skip("this kernel has no autogroups")
        assert group.read_text().split()[-1] == "19"  # "/autogroup-123 nice 19"
    finally:
        child.kill()
        child.wait()
