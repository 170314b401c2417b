"""Doorbells and interrupt vectors: wake-ups across processes in every mode, no lost wake-up."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.transport.conftest import Pair, card_pair
from transport import Mmio, MmioLayout, NotifyMode, NotifyPolicy, Region
from virtio.errors import ClosedResourceError, LocalProtocolError, WouldBlock


async def _pingpong(p: Pair, rounds: int, mode: NotifyMode, spin_ns: int = 50_000) -> dict:
    vec = p.host.mmio.vector(0)
    vec.policy = NotifyPolicy(mode=mode, spin_ns=spin_ns)
    db = p.host.mmio.doorbell(0)
    await p.link.send(
        {
            "op": "pingpong",
            "rounds": rounds,
            "mode": mode.name,
            "spin_ns": spin_ns,
            "vec": 0,
            "db": 0,
        }
    )
    total = 0
    async with asyncio.timeout(60):  # a lost wake-up deadlocks the ping-pong: fail, don't hang
        for _ in range(rounds):
            db.ring()
            total += await vec.wait()
        reply = await p.link.recv()
    assert reply["ok"]
    assert reply["events"] == rounds
    assert total == rounds
    return reply


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", list(NotifyMode))
async def test_doorbells_wake_the_peer(sock_path: str, mode: NotifyMode) -> None:
    async with card_pair(sock_path) as p:
        reply = await _pingpong(p, 500, mode)
        if mode is NotifyMode.EVENTFD:
            assert reply["spin"] == 0
        if mode is NotifyMode.POLL:
            assert reply["sleeps"] == 0


@pytest.mark.asyncio
async def test_no_lost_wakeup_when_ringing_races_with_arming(sock_path: str) -> None:
    """Spin budgets around the ring latency make arming race the ring constantly."""
    async with card_pair(sock_path) as p:
        for spin_ns in (0, 2_000, 20_000):
            reply = await _pingpong(p, 5000, NotifyMode.HYBRID, spin_ns)
            if spin_ns == 0:
                assert reply["sleeps"] > 0  # the arm / re-check / sleep path was exercised
        # a burst of rings is coalesced, never lost: the counts add up exactly
        vec = p.host.mmio.vector(1)
        vec.policy = NotifyPolicy(mode=NotifyMode.EVENTFD)
        await p.link.send({"op": "ring", "db": 1, "n": 5000})
        got = 0
        async with asyncio.timeout(30):
            while got < 5000:
                got += await vec.wait()
            assert (await p.link.recv())["ok"]
        assert got == 5000
        with pytest.raises(WouldBlock):
            vec.wait_nowait()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_no_lost_wakeup_long(sock_path: str) -> None:
    async with card_pair(sock_path) as p:
        await _pingpong(p, 60_000, NotifyMode.HYBRID, 1_000)


@pytest.mark.asyncio
async def test_interrupt_routing_status_and_card_side_wait(sock_path: str) -> None:
    async with card_pair(sock_path) as p:
        mmio = p.host.mmio
        mmio.route(5, 2)  # c2h doorbell 5 -> host vector 2
        with pytest.raises(LocalProtocolError):
            mmio.route(99, 0)
        assert (await p.call(op="ring", db=5))["ok"]
        async with asyncio.timeout(10):
            assert await mmio.vector(2).wait() == 1
        assert mmio.doorbell_status() == {5}
        assert mmio.ack_doorbells(2) == {5}
        assert mmio.doorbell_status() == frozenset()
        # host -> card: the card waits on its vector 3 (eventfd mode), the host rings db 3
        await p.link.send({"op": "wait_vec", "vec": 3, "mode": "EVENTFD"})
        await asyncio.sleep(0.05)
        mmio.doorbell(3).ring()
        async with asyncio.timeout(10):
            assert (await p.link.recv()) == {"ok": True, "n": 1}


def _local_pair() -> tuple[Mmio, Mmio]:
    layout = MmioLayout(h2c_doorbells=4, c2h_doorbells=4, card_vectors=2, host_vectors=2)
    host = Mmio.create(layout)
    region = Region.adopt("mmio", os.dup(host.region.fd), host.region.size)
    efds = tuple(os.dup(fd) for fd in host.eventfds)
    card = Mmio.adopt(region, layout, efds[:2], efds[2:])
    return host, card


@pytest.mark.asyncio
async def test_mask_holds_and_unmask_delivers() -> None:
    host, card = _local_pair()
    try:
        v = card.vector(1)
        v.mask()
        assert v.masked
        host.doorbell(1).ring()
        host.doorbell(3).ring()  # default route 3 -> vector 3 % 2 == 1
        assert v.pending
        with pytest.raises(WouldBlock):
            v.wait_nowait()
        waiter = asyncio.create_task(v.wait())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        v.unmask()
        async with asyncio.timeout(5):
            assert await waiter == 2
        assert card.ack_doorbells(1) == {1, 3}
        # rings made before the receiver attached are not lost either
        host.doorbell(0).ring()
        assert card.vector(0).wait_nowait() == 1
        assert host.doorbells[0].rings == 1
    finally:
        card.close()
        host.close()
    with pytest.raises(ClosedResourceError):
        card.vector(0)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", list(NotifyMode))
async def test_fail_wakes_waiters(mode: NotifyMode) -> None:
    host, card = _local_pair()
    try:
        v = card.vector(0)
        v.policy = NotifyPolicy(mode=mode, spin_ns=1000)
        waiter = asyncio.create_task(v.wait())
        await asyncio.sleep(0.01)
        card.fail(ConnectionAbortedError("gone"))
        with pytest.raises(ConnectionAbortedError):
            async with asyncio.timeout(5):
                await waiter
        with pytest.raises(ConnectionAbortedError):
            v.wait_nowait()
    finally:
        card.close()
        host.close()


def test_notify_policy_is_validated() -> None:
    with pytest.raises(ValueError):
        NotifyPolicy(spin_ns=-1)
    with pytest.raises(ValueError):
        MmioLayout(h2c_doorbells=0)


@pytest.mark.asyncio
async def test_serve_delivers_from_the_callback_holds_masked_rings_and_fails() -> None:
    host, card = _local_pair()
    try:
        v = card.vector(1)
        got: list[int] = []
        host.doorbell(1).ring()  # before serving: pending, delivered at once
        server = asyncio.create_task(v.serve(got.append))
        await asyncio.sleep(0.01)
        assert got == [1]
        host.doorbell(1).ring()
        host.doorbell(3).ring()  # both route to vector 1: coalesced into one call
        await asyncio.sleep(0.01)
        assert got == [1, 2]
        v.mask()
        host.doorbell(1).ring()
        await asyncio.sleep(0.01)
        assert got == [1, 2]  # held while masked ...
        v.unmask()
        await asyncio.sleep(0.01)
        assert got == [1, 2, 1]  # ... and delivered on unmask
        with pytest.raises(LocalProtocolError):
            await v.wait()  # one consumer at a time
        card.fail(ConnectionAbortedError("gone"))
        with pytest.raises(ConnectionAbortedError):
            async with asyncio.timeout(5):
                await server
    finally:
        card.close()
        host.close()


@pytest.mark.asyncio
async def test_serve_ends_with_the_callbacks_error_and_on_close() -> None:
    host, card = _local_pair()
    try:

        def boom(n: int) -> None:
            raise RuntimeError("server bug")

        server = asyncio.create_task(card.vector(0).serve(boom))
        host.doorbell(0).ring()
        with pytest.raises(RuntimeError, match="server bug"):
            async with asyncio.timeout(5):
                await server
        server = asyncio.create_task(card.vector(0).serve(lambda n: None))
        await asyncio.sleep(0.01)
        card.close()
        with pytest.raises(ClosedResourceError):
            async with asyncio.timeout(5):
                await server
    finally:
        card.close()
        host.close()


@pytest.mark.asyncio
async def test_serve_across_processes_loses_no_wakeup(sock_path: str) -> None:
    """The host serves its vector from the eventfd callback; the card echoes each ring."""
    async with card_pair(sock_path) as p:
        rounds = 3000
        db = p.host.mmio.doorbell(0)
        await p.link.send(
            {"op": "pingpong", "rounds": rounds, "mode": "EVENTFD", "spin_ns": 0, "vec": 0, "db": 0}
        )
        seen = 0
        done = asyncio.Event()

        def on_rings(n: int) -> None:
            nonlocal seen
            seen += n
            if seen >= rounds:
                done.set()
            else:
                db.ring()

        server = asyncio.create_task(p.host.mmio.vector(0).serve(on_rings))
        db.ring()
        async with asyncio.timeout(60):  # a lost wake-up stalls the exchange: fail, don't hang
            await done.wait()
            reply = await p.link.recv()
        server.cancel()
        assert reply["ok"]
        assert reply["events"] == rounds
        assert seen == rounds
