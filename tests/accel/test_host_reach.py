"""Host reach through real processes: a host script's requests served by the card's engines.

One daemon (``mic_host.launch``) with the default card for the module. The
host side runs here, in the test process, through ``CardClient.accel_session``;
the card's engine workers do the work in card RAM.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import tempfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import mic_host
from mic_card.accel import AccelError
from mic_card.services import CardServices
from mic_host.client import CardClient
from mic_host.client.accel import AccelRequestError
from mic_host.paths import accel_socket_path
from transport import FramedSocket
from transport.notify import NotifyMode, NotifyPolicy
from virtio.accel import Status
from virtio.errors import LocalProtocolError, ResourceError

pytestmark = pytest.mark.asyncio(loop_scope="module")
DATA = b"offloaded from the host to the card " * 3000
KEY, NONCE = bytes(range(32)), bytes(12)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def card() -> AsyncIterator[CardClient]:
    state = Path(tempfile.mkdtemp(prefix="mic", dir="/tmp"))
    try:
        async with mic_host.launch(state_dir=state) as client:
            c = client.card("mic0")
            await c.wait("online", timeout=60)
            yield c
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def channel_stats(card: CardServices) -> dict[str, Any]:
    """Card app: the accelerators' per-queue counters (what the engines did)."""
    fw = await card.accelerators()
    return {
        name: {
            "available": d.available_instances,
            "totals": d.mgmt.stats()["totals"],
        }
        for name, d in fw.devices.items()
    }


async def reset_queue(card: CardServices, device: str, qid: int) -> str:
    """Card app: ask the device's management queue to reset queue ``qid``."""
    fw = await card.accelerators()
    try:
        await fw.device(device).mgmt.reset_queue(qid)
    except AccelError as e:
        return str(e)
    return "reset"


async def test_requests_are_served_by_the_card_engines(card: CardClient) -> None:
    async with card.accel_session("zlib", level=1) as s:
        assert s.device == "mic-zip"
        out = await s.do(DATA)
        assert out == zlib.compress(DATA, 1)
        stats = (await card.run(f"{__name__}:channel_stats"))["value"]
        assert stats["mic-zip"]["totals"]["bytes_in"] >= len(DATA)  # the engine read card RAM
        assert stats["mic-zip"]["totals"]["requests"] >= 1
        batch = [DATA[: 1000 + i] for i in range(40)]  # one piece: fits the heap
        outs = await s.do_many(batch)
        assert outs == [zlib.compress(d, 1) for d in batch]
        assert s.stats["requests"] == 41
        assert s.stats["doorbells"] <= 2
        # a host channel is not reset in place: the management queue says FAILED
        msg = (await card.run(f"{__name__}:reset_queue", "mic-zip", s.qid))["value"]
        assert "FAILED" in msg
        assert await s.do(b"still open") == zlib.compress(b"still open", 1)
    async with card.accel_session("zlib", op="decompress") as d:
        assert await d.do(zlib.compress(DATA, 9)) == DATA  # grows its output buffer
        with pytest.raises(AccelRequestError) as e:
            await d.do(b"this is not zlib")
        assert e.value.status is Status.CORRUPT_INPUT
        assert await d.do(zlib.compress(b"still usable")) == b"still usable"


async def test_security_engine_and_chains(card: CardClient) -> None:
    async with card.accel_session("sha256") as s:
        assert await s.do(DATA) == hashlib.sha256(DATA).digest()
    async with card.accel_session("aes-gcm", key=KEY, iv=NONCE) as g:
        assert await g.do(DATA, aad=b"hdr") == AESGCM(KEY).encrypt(NONCE, DATA, b"hdr")
    async with card.accel_session("zlib+aes-gcm", level=1, key=KEY, iv=NONCE) as c:
        sealed = await c.do(DATA)
    assert zlib.decompress(AESGCM(KEY).decrypt(NONCE, sealed, None)) == DATA


async def test_closing_returns_the_queue_and_bad_specs_are_refused(card: CardClient) -> None:
    before = (await card.run(f"{__name__}:channel_stats"))["value"]["mic-sec"]["available"]
    async with card.accel_session("sha512") as s:
        assert await s.do(b"abc") == hashlib.sha512(b"abc").digest()
        now = (await card.run(f"{__name__}:channel_stats"))["value"]["mic-sec"]["available"]
        assert now == before - 1
    after = (await card.run(f"{__name__}:channel_stats"))["value"]["mic-sec"]["available"]
    assert after == before
    with pytest.raises(LocalProtocolError, match="unknown algorithm"):
        async with card.accel_session("rot13"):
            pass
    with pytest.raises(LocalProtocolError, match="heap_size"):
        async with card.accel_session("zlib", heap_size=12345):
            pass


async def test_queue_limit_is_a_clear_busy_error(card: CardClient) -> None:
    opened = []
    try:
        for _ in range(16):  # the card's mic-sec has 16 queues
            cm = card.accel_session("sha256", heap_size=64 << 10)
            opened.append((cm, await cm.__aenter__()))
        with pytest.raises(ResourceError, match="busy"):
            await card.accel_session("sha256", heap_size=64 << 10).__aenter__()
    finally:
        for cm, _ in opened:
            await cm.__aexit__(None, None, None)
    async with card.accel_session("sha256") as s:  # freed again
        assert await s.do(b"x") == hashlib.sha256(b"x").digest()


async def test_garbage_on_the_endpoint_harms_nothing(card: CardClient) -> None:
    path = accel_socket_path(card.client.state_dir, card.name)
    for frame in ({"type": "open"}, {"type": "nonsense", "protocol": 7}, {"x": [1] * 10}):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        fs = FramedSocket(sock)
        await fs.send_frame(frame)
        reply, fds = await fs.recv_frame()
        assert reply["type"] == "error"
        assert not fds
        fs.close()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(path))
    raw.sendall(b"\xff" * 64 + b"not a frame at all")
    raw.close()
    assert (await card.status())["state"] == "online"
    async with card.accel_session("zlib", level=1) as s:
        assert await s.do(b"fine") == zlib.compress(b"fine", 1)


async def test_rsa_keys_travel_in_the_key_buffer(card: CardClient) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    async with card.accel_session("rsa-pkcs1v15", key=der) as s:
        sig = await s.do(DATA)
    assert sig == key.sign(DATA, padding.PKCS1v15(), hashes.SHA256())
    async with card.accel_session("rsa-pkcs1v15", op="verify", key=der) as v:
        assert await v.do(sig + DATA) == b""
        with pytest.raises(AccelRequestError) as e:
            await v.do(sig + DATA + b"?")
        assert e.value.status is Status.AUTH_FAILED


async def test_a_cancelled_request_does_not_confuse_the_next(card: CardClient) -> None:
    # no spin: the task must sleep on the interrupt once it rang, so the request is
    # still on the card when it is cancelled. A test process descheduled between the
    # ring and the sleep can still miss that window; then that round is retried.
    quiet = NotifyPolicy(NotifyMode.EVENTFD)
    async with card.accel_session("zlib", level=9, policy=quiet) as s:
        big = DATA * 8
        for _ in range(5):
            rung = s.stats["doorbells"]
            task = asyncio.create_task(s.do(big))
            for _ in range(100_000):  # the task lays the request out and rings
                if s.stats["doorbells"] != rung:
                    break
                await asyncio.sleep(0)
            else:
                pytest.fail("the request never rang the doorbell")
            if task.done():  # answered before we looked: not a cancellation test
                assert await task == zlib.compress(big, 9)
                continue
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            break
        else:
            pytest.fail("5 requests in a row were answered before they could be cancelled")
        # the card may still be answering the cancelled request: the session drains it
        assert await s.do(b"next") == zlib.compress(b"next", 9)
        assert await s.do(DATA) == zlib.compress(DATA, 9)


async def test_a_pool_spreads_a_batch_over_the_card_engines(card: CardClient) -> None:
    items = [DATA[: 20_000 + 997 * i] for i in range(24)]
    async with card.accel_pool("zlib", channels=2, level=1) as p:
        assert len({s.qid for s in p.sessions}) == 2
        assert await p.do_many(items) == [zlib.compress(d, 1) for d in items]  # order kept
        assert [await p.do(d) for d in items[:3]] == [zlib.compress(d, 1) for d in items[:3]]
        assert p.stats["requests"] == 27
        assert all(s.stats["requests"] >= 12 for s in p.sessions)  # both engines worked
    with pytest.raises(LocalProtocolError):
        async with card.accel_pool("zlib", channels=0):
            pass
