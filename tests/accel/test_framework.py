"""The framework through real worker processes: queues, memory modes, receives, isolation."""

from __future__ import annotations

import asyncio
import hashlib
import os
import zlib

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mic_card.accel import (
    AccelFramework,
    QState,
    QueueBusy,
    QueueStateError,
    Request,
    RequestError,
    Session,
    SessionSpec,
    Status,
)
from mic_card.accel.wire import API, Alg, Op, StatusWord
from virtio.errors import LocalProtocolError, WouldBlock

pytestmark = pytest.mark.asyncio(loop_scope="module")
DATA = b"accelerators on the card " * 2000


async def test_attributes(fw: AccelFramework) -> None:
    zip_ = fw.device("mic-zip")
    a = zip_.attrs()
    assert a["api"] == API
    assert a["flags"] == 1
    assert a["available_instances"] == 4
    assert a["algorithms"].split("\n") == ["deflate", "zlib", "gzip"]
    assert a["isolate"] == 0
    assert a["node_id"] == 0
    assert fw.device("mic-zip-nosva").attrs()["flags"] == 0
    assert next(d.name for d in fw.find("zlib", node=1)) == "mic-zip-nosva"
    assert fw.find("zlib+aes-gcm")
    caps = zip_.mgmt.capabilities()
    assert caps["ring_size"] == 256
    assert caps["chaining"]


@pytest.mark.parametrize(
    "spec",
    [
        SessionSpec("deflate", level=1),
        SessionSpec("zlib", level=9),
        SessionSpec("gzip"),
        SessionSpec("aes-cbc", key=bytes(32), iv=bytes(16)),
        SessionSpec("aes-ctr", key=bytes(16), iv=bytes(16)),
        SessionSpec("aes-xts", key=bytes(range(64)), iv=bytes(16)),
        SessionSpec("aes-gcm", key=bytes(32), iv=bytes(12)),
    ],
    ids=lambda s: s.alg,
)
async def test_round_trips_through_workers(fw: AccelFramework, spec: SessionSpec) -> None:
    fwd = await fw.open_session(spec.alg, level=spec.level, key=spec.key, iv=spec.iv)
    assert fwd.provider == "mic"
    out = bytes(await fwd.do(DATA))
    inv = "decompress" if spec.alg in ("deflate", "zlib", "gzip") else "decrypt"
    back = await fw.open_session(spec.alg, op=inv, key=spec.key, iv=spec.iv)
    assert bytes(await back.do(out)) == DATA
    if spec.alg == "gzip":
        assert zlib.decompress(out, 31) == DATA
    if spec.alg == "aes-gcm":
        assert out == AESGCM(spec.key).encrypt(spec.iv, DATA, None)


async def test_digests_and_aad(fw: AccelFramework) -> None:
    s = await fw.open_session("sha512")
    assert bytes(await s.do(DATA)) == hashlib.sha512(DATA).digest()
    g = await fw.open_session("aes-gcm", key=bytes(16), iv=bytes(12))
    assert bytes(await g.do(b"payload", aad=b"header")) == AESGCM(bytes(16)).encrypt(
        bytes(12), b"payload", b"header"
    )
    bad = await fw.open_session("aes-cbc", key=b"123", iv=bytes(16))
    with pytest.raises(RequestError) as ei:
        await bad.do(bytes(32))
    assert ei.value.status is Status.BAD_KEY


async def test_streaming_and_decompress_growth(fw: AccelFramework) -> None:
    big = os.urandom(1000) * 300  # 300 KB, compresses well: default out_size too small
    comp = zlib.compress(big)
    d = await fw.open_session("zlib", op="decompress", out_size=4096)
    assert bytes(await d.do(comp)) == big
    c = await fw.open_session("gzip", stream=True, level=1)
    parts = [await c.do(big[i : i + 50_000]) for i in range(0, len(big), 50_000)]
    parts.append(await c.do(b"", finish=True))
    assert zlib.decompress(b"".join(parts), 31) == big
    h = await fw.open_session("sha256", stream=True)
    for i in range(0, len(big), 100_000):
        assert await h.do(big[i : i + 100_000]) == b""
    assert await h.do(b"", finish=True) == hashlib.sha256(big).digest()
    with pytest.raises(RequestError) as ei:
        await d.do(b"garbage" * 10)
    assert ei.value.status is Status.CORRUPT_INPUT


async def test_chaining_through_worker(fw: AccelFramework) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    s = await fw.open_session("zlib+aes-gcm", level=1, key=key, iv=nonce)
    out = bytes(await s.do(DATA))
    assert out == AESGCM(key).encrypt(nonce, zlib.compress(DATA, 1), None)
    r = await fw.open_session("zlib+aes-gcm", op="decrypt_decompress", key=key, iv=nonce)
    assert bytes(await r.do(out)) == DATA


async def test_queue_states_and_exhaustion(fw: AccelFramework) -> None:
    dev = fw.device("mic-sec")
    avail = dev.available_instances
    qs = [await dev.open() for _ in range(avail)]
    try:
        assert dev.available_instances == 0
        with pytest.raises(QueueBusy, match="busy"):
            await dev.open()
        q = qs[0]
        assert q.state is QState.INIT
        with pytest.raises(QueueStateError):
            q.submit(Request(Op.NOP))
        await q.start()
        assert q.state is QState.STARTED
        with pytest.raises(QueueStateError):
            await q.start()
        await q.put()
        assert q.state is QState.ZOMBIE
        with pytest.raises(QueueStateError):
            q.submit(Request(Op.NOP))
        # (state, event) pairs outside the table are refused, the state unchanged
        with pytest.raises(QueueStateError):
            await q.start()
        with pytest.raises(QueueStateError):
            await q.reset()
        assert q.state is QState.ZOMBIE
    finally:
        for q in qs:
            await q.aclose()
    assert dev.available_instances == avail


async def test_pasid_isolation(fw: AccelFramework) -> None:
    dev = fw.device("mic-zip")
    async with dev.mgmt.faults() as faults, dev.queue() as qa, dev.queue() as qb:
        secret = qa.alloc(4096)
        secret.view[:] = os.urandom(4096)
        assert qa.pasid != qb.pasid
        # queue B is asked to read queue A's shared memory: refused per request
        sb = Session([qb], SessionSpec("zlib"))
        t = qb.submit(sb.request(secret))
        c = await qb.recv()
        assert t.done
        assert c.status is Status.ACCESS_FAULT
        # a raw address into B's own ring area is refused too (requests see only the heap)
        qb.submit(Request(Op.COMPRESS, Alg.ZLIB, src=b"x" * 10, src_addr=qb.geometry.base))
        assert (await qb.recv()).status is Status.ACCESS_FAULT
        # the queue still works, and the fault was counted
        assert zlib.decompress(bytes(await sb.do(b"fine" * 100))) == b"fine" * 100
        assert qb.status_word(StatusWord.ACCESS_FAULTS) == 2
        ev = await asyncio.wait_for(faults.get(), 5)  # counted against isolate_strategy
        assert ev.kind == "access"
        assert ev.qid == qb.qid
        assert dev.fault_count() >= 1
        # zero copy in SVA mode: output lands in A's shared buffer
        dst = qa.alloc(8192)
        sa = Session([qa], SessionSpec("zlib", level=1))
        out = await sa.do(secret, dst=dst)
        assert isinstance(out, memoryview)
        assert zlib.decompress(out) == bytes(secret.view)
        secret.free()
        dst.free()


async def test_nosva_device_uses_the_bounce_pool(fw: AccelFramework) -> None:
    dev = fw.device("mic-zip-nosva")
    async with dev.queue() as q:
        with pytest.raises(LocalProtocolError, match="no SVA"):
            q.alloc(10)
        s = Session([q], SessionSpec("deflate", level=1))
        assert zlib.decompress(bytes(await s.do(DATA)), -15) == DATA


async def test_batch_poll_and_receives(fw: AccelFramework) -> None:
    dev = fw.device("mic-sec")
    async with dev.queue() as q:
        s = Session([q], SessionSpec("sha256"))
        with pytest.raises(WouldBlock):
            s.recv_nowait()
        items = [os.urandom(100 + i) for i in range(40)]
        doorbells = q.stats.doorbells
        s.submit_many(items)
        # a batch rings at most twice: when its first piece is published (so the
        # engine starts early) and once at the end if the ring core asked meanwhile
        assert doorbells + 1 <= q.stats.doorbells <= doorbells + 2
        got = {}
        while len(got) < len(items):
            for c in s.poll():
                got[c.tag] = bytes(c.output)
            if len(got) < len(items):
                c = await s.recv()
                got[c.tag] = bytes(c.output)
        assert got == {i: hashlib.sha256(d).digest() for i, d in enumerate(items)}
        with pytest.raises(QueueStateError):
            await s.recv()  # nothing in flight: refuse instead of sleeping forever
        stats = dev.mgmt.stats()
        assert stats["queues"][q.qid]["requests"] >= 40
        # published in one piece to an idle engine, a batch is exactly one doorbell
        q.publish_every = len(items)
        await asyncio.sleep(0.05)  # the engine re-enabled notifications and sleeps
        doorbells = q.stats.doorbells
        s.submit_many(items)
        assert q.stats.doorbells == doorbells + 1
        while q.outstanding:
            await q.wait_for(lambda: not q.outstanding)
        assert len(s.poll()) == len(items)


async def test_full_ring_gives_would_block(fw: AccelFramework) -> None:
    dev = fw.device("mic-sec")
    async with dev.queue() as q:
        reqs = [(Request(Op.NOP), i) for i in range(q.geometry.slots + 5)]
        with pytest.raises(WouldBlock):
            q.submit_many(reqs)
        assert q.outstanding == q.geometry.slots
        while q.outstanding:
            await q.wait_for(lambda: not q.outstanding)
        assert len(q.poll()) == q.geometry.slots
