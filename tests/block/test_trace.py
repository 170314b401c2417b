"""``MIC_TRACE``: the daemon and its card record every hop of a block request.

Real processes: a daemon started with ``MIC_TRACE=DIR``, a card app doing
QD1 reads; at exit both processes write their marks and the merged breakdown
shows each request cross every hop, in order.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import mic_host
from bench import config as bench_config
from transport.tracing import load
from virtio import trace


def _config(image: Path) -> str:
    return bench_config.card(
        bench_config.block(image, create=True, size="4M"), card_ram=None, heartbeat_timeout=None
    )


def _trace_files(where: Path) -> list[str]:
    return sorted(p.name.split("-")[0] for p in where.glob("**/*-*.json"))


@pytest.mark.asyncio
async def test_trace_records_every_hop_of_a_block_request(state_dir: Path) -> None:
    out = state_dir / "trace"
    cfg = _config(state_dir / "disk.img")
    async with mic_host.launch(state_dir, cfg, env={"MIC_TRACE": str(out)}) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=30)
        res = await card.run("bench.latency:card_block", "vda", False, 40)
        assert len(res["value"]["lat_ns"]) == 40
    assert _trace_files(out) == ["card", "host"]  # each process wrote its own marks at exit
    b = trace.breakdown(load(out))
    assert b["episodes"] >= 40
    steps = [s["step"] for s in b["steps"]]  # type: ignore[attr-defined]
    assert steps == [
        "submit -> doorbell",
        "doorbell -> host_wake",
        "host_wake -> pop",
        "pop -> io_done",
        "io_done -> push",
        "push -> interrupt",
        "interrupt -> card_irq",
        "card_irq -> complete",
    ]


@pytest.mark.asyncio
async def test_no_trace_without_the_variable(state_dir: Path) -> None:
    cfg = _config(state_dir / "disk.img")
    async with mic_host.launch(state_dir, cfg) as client:
        card = client.card("mic0")
        await card.wait("online", timeout=30)
        await card.run("bench.latency:card_block", "vda", True, 5)
    assert _trace_files(state_dir) == []
