"""Regions, windows and address translation, through a real card process."""

from __future__ import annotations

import os

import pytest

from tests.transport.conftest import card_pair
from transport import (
    SMPT_BASE,
    CardAddressSpace,
    HostAddressSpace,
    Mmio,
    MmioLayout,
    Perm,
    Region,
    RegionError,
    SmptTable,
    WindowFault,
)
from virtio.errors import ClosedResourceError, LocalProtocolError
from virtio.memory import Memory, MemoryFault


@pytest.mark.asyncio
async def test_memory_is_shared_at_translated_addresses(sock_path: str) -> None:
    async with card_pair(sock_path, boot_params={"cmdline": "quiet"}) as p:
        host = p.host
        win = host.smpt.open(0x10000, 0x10000)
        host.mmio.spad.set_device_page(win.addr(0x100))
        info = await p.call(op="info")
        assert info["boot"] == {"cmdline": "quiet"}
        assert info["card"] == "mic0"
        assert p.link.peer_pid == info["pid"] == p.proc.pid
        assert (await p.call(op="spad"))["dp"] == SMPT_BASE + 0x10100
        # card writes into the host window -> host sees it in its RAM
        r = await p.call(op="write", addr=win.addr(0x100), data=b"from card".hex())
        assert r["ok"]
        assert bytes(host.host_ram.view()[0x10100:0x10109]) == b"from card"
        # ... and through its own view of card-physical addresses
        assert bytes(host.aperture.view(SMPT_BASE + 0x10100, 9)) == b"from card"
        # host writes card RAM through the aperture -> card reads it at the same address
        host.aperture.view(0x2000, 8, write=True)[:] = b"aperture"
        assert bytes.fromhex((await p.call(op="read", addr=0x2000, len=8))["data"]) == b"aperture"
        # card writes its RAM -> host reads through the aperture
        await p.call(op="write", addr=0x3000, data=b"card ram".hex())
        assert bytes(host.aperture.view(0x3000, 8)) == b"card ram"


@pytest.mark.asyncio
async def test_faults_are_typed_counted_and_harmless_on_both_sides(sock_path: str) -> None:
    async with card_pair(sock_path) as p:
        host = p.host
        ram = host.config.card_ram_size
        # never-opened window, past card RAM, straddling card RAM's end
        for addr, n in ((SMPT_BASE, 4), (ram, 1), (ram - 2, 4), (SMPT_BASE - 8, 4)):
            r = await p.call(op="read", addr=addr, len=n)
            assert not r["ok"]
            assert "refused" in r["fault"]
            with pytest.raises(WindowFault):
                host.aperture.view(addr, n)
        assert (await p.call(op="info"))["faults"] == 4
        assert host.aperture.faults.count == 4
        assert isinstance(host.aperture.faults.last, MemoryFault)
        # the card process is still alive and serving
        assert (await p.call(op="echo", payload=1))["echo"] == 1

        # open at run time -> usable; close at run time -> faults on both sides
        win = host.smpt.open(0x4000, 0x1000)
        assert (await p.call(op="write", addr=win.addr(0xFF0), data="aa" * 16))["ok"]
        r = await p.call(op="write", addr=win.addr(0xFF8), data="aa" * 16)  # straddles the end
        assert not r["ok"]
        host.smpt.close(win)
        r = await p.call(op="read", addr=win.addr(0), len=1)
        assert not r["ok"]
        assert "not inside an open SMPT window" in r["fault"]
        with pytest.raises(WindowFault):
            host.aperture.view(win.addr(0), 1)
        # the memory itself was left alone
        assert bytes(host.host_ram.view()[0x4FF0:0x5000]) == b"\xaa" * 16


@pytest.mark.asyncio
async def test_read_only_window(sock_path: str) -> None:
    async with card_pair(sock_path) as p:
        win = p.host.smpt.open(0, 0x1000, Perm.READ)
        p.host.host_ram.view()[0:4] = b"ro!!"
        assert bytes.fromhex((await p.call(op="read", addr=win.addr(0), len=4))["data"]) == b"ro!!"
        r = await p.call(op="write", addr=win.addr(0), data="00")
        assert not r["ok"]
        assert "read-only" in r["fault"]
        assert bytes(p.host.host_ram.view()[0:4]) == b"ro!!"
        assert p.host.aperture.view(win.addr(0), 4).readonly


def _spaces() -> tuple[Region, Region, Mmio, SmptTable, HostAddressSpace, CardAddressSpace]:
    card = Region.create("card_ram", 1 << 16)
    host = Region.create("host_ram", 1 << 16)
    mmio = Mmio.create(MmioLayout())
    smpt = SmptTable(mmio.words, host.size)
    return (
        card,
        host,
        mmio,
        smpt,
        HostAddressSpace(card, host, smpt),
        CardAddressSpace(card, host, mmio.words),
    )


def test_spaces_implement_memory_and_window_rules() -> None:
    card, host, mmio, smpt, hs, cs = _spaces()
    try:
        assert isinstance(hs, Memory)
        assert isinstance(cs, Memory)
        with pytest.raises(LocalProtocolError):
            smpt.open(1, 0x1000)  # misaligned
        with pytest.raises(LocalProtocolError):
            smpt.open(0, 1 << 20)  # beyond host RAM
        w = smpt.open(0, 0x2000)
        with pytest.raises(LocalProtocolError):
            smpt.open(0x1000, 0x1000)  # overlap
        assert cs.windows == (w,)
        assert hs.windows == (w,)
        gen = smpt.generation
        smpt.close(w)
        assert smpt.generation == gen + 2
        assert cs.windows == ()
        with pytest.raises(LocalProtocolError):
            smpt.close(w)
        opened = [smpt.open(i * 0x1000, 0x1000) for i in range(16)]
        assert len(cs.windows) == 16
        smpt.close_all()
        assert cs.windows == ()
        assert opened
        for bad in ((-1, 1), (0, -1), ((1 << 64) - 1, 2)):
            with pytest.raises(WindowFault):
                cs.view(*bad)
        assert cs.faults.count == 3
        hs_free = HostAddressSpace(card, host, smpt, enforce_windows=False)
        assert len(hs_free.view(SMPT_BASE, 16)) == 16
        hs_free.release()
    finally:
        hs.release()
        cs.release()
        mmio.close()
        card.close()
        host.close()


def test_region_is_sealed_and_checked_on_adoption() -> None:
    with Region.create("r", 8192) as r:
        fd = os.dup(r.fd)
        with Region.adopt("r", fd, 8192) as r2:
            r.view()[0:3] = b"abc"
            assert bytes(r2.view()[0:3]) == b"abc"
            with pytest.raises(OSError):
                os.ftruncate(r2.fd, 4096)  # sealed: the peer cannot SIGBUS us
        with pytest.raises(RegionError):
            Region.adopt("r", os.dup(r.fd), 4096)  # wrong size
    unsealed = os.memfd_create("x")
    os.ftruncate(unsealed, 4096)
    with pytest.raises(RegionError):
        Region.adopt("x", unsealed, 4096)
    with pytest.raises(RegionError):
        Region.create("bad", 100)
    r3 = Region.create("c", 4096)
    v = r3.view()[0:10]  # an outstanding sub-view does not break close()
    r3.close()
    r3.close()
    with pytest.raises(ClosedResourceError):
        r3.view()
    v.release()


def test_shared_ranges_are_what_the_card_can_reach_read_write() -> None:
    """What a vhost-user back-end is given to map (docs/vhost-user.md, Front-end):
    card RAM and the read-write windows, as the bytes of the regions' memfds."""
    card, host, mmio, smpt, hs, cs = _spaces()
    try:
        rw = smpt.open(0x2000, 0x2000)
        smpt.open(0x8000, 0x1000, Perm.READ)  # a file mapping cannot be read-only: left out
        ranges = hs.shared_ranges()
        assert [(r.bus, r.size, r.fd, r.offset) for r in ranges] == [
            (0, card.size, card.fd, 0),
            (rw.addr(0), 0x2000, host.fd, 0x2000),
        ]
        hs.view(rw.addr(0x10), 4, True)[:] = b"host"
        hs.view(0x20, 4, True)[:] = b"card"
        for r, addr, want in ((ranges[1], rw.addr(0x10), b"host"), (ranges[0], 0x20, b"card")):
            assert os.pread(r.fd, 4, r.offset + addr - r.bus) == want
        free = HostAddressSpace(card, host, smpt, enforce_windows=False)
        assert [(r.bus, r.size, r.offset) for r in free.shared_ranges()] == [
            (0, card.size, 0),
            (SMPT_BASE, host.size, 0),
        ]
        free.release()
    finally:
        hs.release()
        cs.release()
        mmio.close()
        card.close()
        host.close()
