"""Turns the per-hop trace (:mod:`virtio.trace`) on from the environment.

``MIC_TRACE=DIR`` in the environment of ``mic-host`` (inherited by the
``mic-card`` processes it spawns) makes each process record its hops with
``time.perf_counter_ns`` (``CLOCK_MONOTONIC``, shared by every process of the
machine) and write them at exit to ``DIR/<role>-<pid>.json``. Off (the
default) it costs nothing but the flag test at each hop.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path

from virtio import trace

__all__ = ["ENV", "install_from_env", "load"]

ENV = "MIC_TRACE"


def install_from_env(role: str) -> bool:
    """Enable the trace if ``$MIC_TRACE`` names a directory; True if it did."""
    where = os.environ.get(ENV, "").strip()
    if not where:
        return False
    out = Path(where)
    trace.enable(time.perf_counter_ns)

    def dump() -> None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{role}-{os.getpid()}.json"
            path.write_text(json.dumps(trace.records()))
        except OSError:  # pragma: no cover - best effort at exit
            pass

    atexit.register(dump)
    return True


def load(where: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """Every record written under ``where`` (all processes), ``(hop, ns)``."""
    marks: list[tuple[int, int]] = []
    for p in Path(where).glob("*.json"):
        marks.extend((int(h), int(t)) for h, t in json.loads(p.read_text()))
    return marks
