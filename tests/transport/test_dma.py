"""DMA engine: byte-exact copies host<->card, alignment fallback, ordering, refusals."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from tests.transport.conftest import card_pair
from transport import (
    SMPT_BASE,
    CardAddressSpace,
    DmaAlignmentError,
    DmaEngine,
    DmaError,
    DmaFault,
    DmaOverlapError,
    DmaPath,
    DmaPolicy,
    HostAddressSpace,
    Mmio,
    MmioLayout,
    PcieConfig,
    Region,
    SmptTable,
    UnalignedPolicy,
)
from virtio.errors import ClosedResourceError, WouldBlock

MiB = 1 << 20
BIG = PcieConfig(card_ram_size=32 * MiB, host_ram_size=32 * MiB)
SIZES = [1, 63, 64, 4095, 4096, 65536 + 7, MiB, 5 * MiB + 64, 24 * MiB]
OFFSETS = [(0, 0), (64, 128), (1, 0), (0, 63), (4033, 17)]


def _pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.asyncio
async def test_dma_is_byte_exact_both_directions(sock_path: str) -> None:
    async with card_pair(sock_path, config=BIG) as p, p.host.dma() as dma:
        host = p.host
        win = host.smpt.open(0, 32 * MiB)
        hram = host.host_ram.view()
        for i, n in enumerate(SIZES):
            so, do = OFFSETS[i % len(OFFSETS)]
            data = _pattern(n, i)
            # host -> card: source in host RAM (through the window), destination card RAM
            hram[so : so + n] = data
            comp = await dma.copy(do, win.addr(so), n, channel=i % 4)
            aligned = not (so | do | n) % 64
            assert comp.path is (DmaPath.DMA if aligned else DmaPath.CPU)
            r = await p.call(op="sha256", addr=do, len=n)
            assert r["sha256"] == hashlib.sha256(data).hexdigest(), (n, so, do)
            # card -> host: the card's engine copies it back into the window elsewhere
            back = 16 * MiB - (16 * MiB % 64) + so if n <= 8 * MiB else so + 64
            if n > 8 * MiB:
                back = 0  # overwrite the source region (different range from card RAM)
            hram[back : back + n] = b"\0" * n
            r = await p.call(op="dma", dst=win.addr(back), src=do, len=n)
            assert r["ok"], r
            assert hashlib.sha256(hram[back : back + n]).digest() == hashlib.sha256(data).digest()
        st = dma.stats()
        assert st.ops == len(SIZES)
        assert st.bytes == sum(SIZES)
        unaligned = [(OFFSETS[i % 5][0] | OFFSETS[i % 5][1] | n) % 64 for i, n in enumerate(SIZES)]
        assert st.cpu_fallbacks == sum(1 for u in unaligned if u)
        hram.release()


@pytest.mark.asyncio
async def test_out_of_window_dma_is_refused(sock_path: str) -> None:
    async with card_pair(sock_path) as p, p.host.dma() as dma:
        host = p.host
        win = host.smpt.open(0x10000, 0x10000)
        cases = [
            (0, SMPT_BASE, 64),  # source in a never-opened part of host RAM
            (0, win.addr(0x10000 - 64), 128),  # runs off the end of the window
            (host.config.card_ram_size - 64, win.addr(0), 128),  # past card RAM
        ]
        for dst, src, n in cases:
            with pytest.raises(DmaFault) as e:
                await dma.copy(dst, src, n)
            assert e.value.fault.addr in (dst, src)
        assert dma.stats().faults == 3
        assert dma.stats().ops == 0
        r = await p.call(op="dma", dst=0, src=SMPT_BASE, len=64)
        assert r == {"ok": False, "dma_error": "DmaFault", "msg": r["msg"]}
        # a window closed after submission faults when the queued request runs
        ch = dma.channel(1)
        first = ch.submit(0, 0x100000, 0x8000, fence=True)  # fenced: queued, not done inline
        second = ch.submit(0x200000, win.addr(0), 0x1000)  # queued behind it, checked at submit
        host.smpt.close(win)
        await first
        with pytest.raises(DmaFault):
            await second
        assert (await p.call(op="echo", payload=0))["ok"]


def _local() -> tuple[Region, Region, Mmio, HostAddressSpace]:
    card = Region.create("card_ram", 4 * MiB)
    host = Region.create("host_ram", 4 * MiB)
    mmio = Mmio.create(MmioLayout())
    smpt = SmptTable(mmio.words, host.size)
    smpt.open(0, 4 * MiB)
    return card, host, mmio, HostAddressSpace(card, host, smpt)


@pytest.mark.asyncio
async def test_ordering_fence_status_word_and_threads() -> None:
    card, host, mmio, space = _local()
    try:
        policy = DmaPolicy(channels=2, thread_threshold=MiB, chunk=256 * 1024)
        async with DmaEngine(space, policy) as dma:
            hv = host.view()
            hv[: 2 * MiB] = _pattern(2 * MiB, 1)
            src = SMPT_BASE
            ch0, ch1 = dma.channels
            # queue: big threaded copy, then a chunked one, then one with a status word
            r1 = ch0.submit(0, src, 2 * MiB)
            r2 = ch0.submit(2 * MiB, src, 512 * 1024 + 64)  # chunked (> chunk, < threshold)
            r3 = ch0.submit(3 * MiB, src + 64, 4096, status_addr=src + 3 * MiB, status_value=0xD0E)
            assert not r3.done()
            assert ch0.pending == 3
            with pytest.raises(WouldBlock):
                r3.result()
            # a fenced request on the other channel runs only after all three
            r4 = ch1.submit(3 * MiB + 8192, 0, 64, fence=True)
            c4 = await r4
            assert r1.done()
            assert r2.done()
            assert r3.done()
            assert [r1.result().path, r2.result().path, c4.path] == [
                DmaPath.THREAD,
                DmaPath.DMA,
                DmaPath.DMA,
            ]
            assert hv[3 * MiB : 3 * MiB + 8].cast("Q")[0] == 0xD0E  # status written after data
            assert bytes(card.view()[: 2 * MiB]) == bytes(hv[: 2 * MiB])
            await ch1.fence()
            await dma.drain()
            st = dma.stats()
            assert st.thread_copies == 1
            assert st.status_writes == 1
            assert st.fences == 2
            with pytest.raises(DmaOverlapError):
                ch0.submit(src + 64, src, 128)
            with pytest.raises(DmaError):
                ch0.submit(0, src, 0)
            with pytest.raises(DmaError):
                ch0.submit(0, src, 64, status_addr=src + 3)
            hv.release()
        with pytest.raises(ClosedResourceError):
            ch0.submit(0, src, 64)
        strict = DmaPolicy(unaligned=UnalignedPolicy.REFUSE)
        async with DmaEngine(space, strict) as dma:
            await dma.copy(0, src, 128)
            with pytest.raises(DmaAlignmentError):
                await dma.copy(1, src, 128)
    finally:
        space.release()
        mmio.close()
        card.close()
        host.close()


@pytest.mark.asyncio
async def test_card_space_dma_is_window_checked() -> None:
    card, host, mmio, hspace = _local()
    cspace = CardAddressSpace(card, host, mmio.words)
    try:
        async with DmaEngine(cspace) as dma:
            await dma.copy(SMPT_BASE + 4096, 0, 4096)
            with pytest.raises(DmaFault):
                await dma.copy(SMPT_BASE + 8 * MiB, 0, 64)
        assert cspace.faults.count == 1
    finally:
        cspace.release()
        hspace.release()
        mmio.close()
        card.close()
        host.close()


def test_engine_must_run_in_a_loop() -> None:
    card, host, mmio, space = _local()
    try:
        dma = DmaEngine(space)
        with pytest.raises(ClosedResourceError):
            dma.channel(0).submit(0, SMPT_BASE, 64)
        asyncio.run(dma.aclose())
    finally:
        space.release()
        mmio.close()
        card.close()
        host.close()


def _dma_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("dma-ch")]


@pytest.mark.asyncio
async def test_no_engine_runs_until_a_data_path_opens_one(sock_path: str) -> None:
    """A link starts no DMA workers; ``host.dma()`` opens an engine (one worker
    per channel) that stops when its block ends, and can be entered once."""
    async with card_pair(sock_path) as p:
        host = p.host
        assert _dma_tasks() == []
        async with host.dma(DmaPolicy(channels=2)) as dma:
            assert sorted(_dma_tasks()) == ["dma-ch0", "dma-ch1"]
            host.smpt.open(0, 4096)
            await dma.copy(0, SMPT_BASE, 64)
            with pytest.raises(ClosedResourceError):
                await dma.__aenter__()
        await asyncio.sleep(0)
        assert _dma_tasks() == []
        with pytest.raises(ClosedResourceError):
            dma.channel(0).submit(0, SMPT_BASE, 64)
        # the card's engine: opened for one copy and closed again
        r = await p.call(op="dma", dst=SMPT_BASE, src=0, len=64)
        assert r["ok"], r
