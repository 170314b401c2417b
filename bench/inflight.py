"""What inflight tracking (INFLIGHT_SHMFD) adds per request on a vhost-user blk ring.

A/B in one process, rounds interleaved: the same split ring served by a plain
:class:`virtio.split.DeviceQueue` and by the tracked queue
(:class:`mic_host.vhost_user.inflight.TrackedQueue`) on an anonymous region,
both driven by a :class:`DriverQueue` in batches (pop, complete, publish, as
the block backend's endpoint does). The figure is the whole loop's cost per
request, driver included; the difference is the tracking's (mark at pop,
clear at publish). Only the vhost-user blk back-end pays it, and only when
the front-end negotiated INFLIGHT_SHMFD; VOP's rings are untouched.

Run: ``python -m bench.inflight [--rounds N] [--requests N] [--batch N]``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time

from mic_host.vhost_user.inflight import InflightRegion, queue_region_size
from virtio.memory import FlatMemory
from virtio.split import DeviceQueue, DriverQueue, QueueState, SplitLayout

SIZE = 128
LAYOUT = SplitLayout.contiguous(0, SIZE)


def _loop(tracked: bool, requests: int, batch: int) -> float:
    """Nanoseconds per request of one run."""
    mem = FlatMemory(0x20000)
    drv: DriverQueue[int] = DriverQueue(mem, LAYOUT, 0)
    state = QueueState(LAYOUT, 0, 0, False, False, True, ())
    region = None
    if tracked:
        region = InflightRegion(mmap.mmap(-1, queue_region_size(SIZE)), 1, SIZE)
        q: DeviceQueue = region.start_queue(0, mem, state)
    else:
        q = DeviceQueue.restore(mem, state)
    done = 0
    t0 = time.perf_counter()
    while done < requests:
        for k in range(batch):
            drv.add([], [(0x8000 + 64 * k, 1)], k)
        drv.publish()
        for chain in q.pop_many():
            q.add_used(chain.head, 1)
        q.publish_used()
        drv.get_used_many()
        done += batch
    elapsed = time.perf_counter() - t0
    if region is not None:
        del q
        region.close()
    return elapsed / done * 1e9


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.inflight", description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}; batch {args.batch}")
    ratios = []
    for r in range(args.rounds):
        plain = _loop(False, args.requests, args.batch)
        tracked = _loop(True, args.requests, args.batch)
        ratios.append(tracked / plain)
        print(
            f"round {r}: plain {plain:.0f} ns/req, tracked {tracked:.0f} ns/req "
            f"(+{tracked - plain:.0f} ns, x{tracked / plain:.2f})"
        )
    ratios.sort()
    print(f"median ratio tracked/plain: x{ratios[len(ratios) // 2]:.2f}")


if __name__ == "__main__":
    main()
