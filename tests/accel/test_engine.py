"""The engines, sans-IO: every algorithm against the library called directly.

Known-answer vectors: NIST SP 800-38A (CBC F.2.1, CTR F.5.1), the GCM paper's
test case 2, FIPS 180 "abc", RFC 4231 test case 1.
"""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import os
import zlib

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mic_card.accel.engine import EngineConfig, QueueServer, StreamTable, run_op
from mic_card.accel.providers.soft import compute
from mic_card.accel.session import SessionSpec
from mic_card.accel.wire import (
    REQ_STRUCT,
    RESP_OFF,
    RESP_STRUCT,
    SLOT_SIZE,
    WIRE_VERSION,
    Alg,
    Op,
    QueueGeometry,
    ReqFlag,
    Status,
    StatusWord,
)
from virtio.memory import FlatMemory
from virtio.split import DriverQueue

ALL = EngineConfig(frozenset(Alg) - {Alg.NONE}, allow_inject=False)
DATA = b"The quick brown fox jumps over the lazy dog. " * 300
K16 = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
PT = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")


def op(o: Op, a: Alg, src: bytes, *, cap: int = 1 << 20, key: bytes = b"", iv: bytes = b"",
       level: int = 6, flags: int = 0, alg2: Alg = Alg.NONE, aad: bytes = b"",
       streams: StreamTable | None = None, sid: int = 1, tag: int = 0):  # fmt: skip
    return run_op(
        ALL, streams or StreamTable(), o, a, alg2, level, flags, sid, key, iv, tag,
        memoryview(src), aad, cap,
    )  # fmt: skip


@pytest.mark.parametrize(("alg", "wbits"), [(Alg.DEFLATE, -15), (Alg.ZLIB, 15), (Alg.GZIP, 31)])
@pytest.mark.parametrize("level", [1, 6, 9])
def test_compression_round_trip_vs_zlib(alg: Alg, wbits: int, level: int) -> None:
    r = op(Op.COMPRESS, alg, DATA, level=level)
    assert r.status is Status.OK
    assert r.consumed == len(DATA)
    assert bytes(r.output) == zlib.compress(DATA, level, wbits)
    d = op(Op.DECOMPRESS, alg, bytes(r.output))
    assert d.status is Status.OK
    assert bytes(d.output) == DATA


def test_known_answers() -> None:
    cbc = op(Op.ENCRYPT, Alg.AES_CBC, PT, key=K16, iv=bytes(range(16)))
    assert bytes(cbc.output).hex() == "7649abac8119b246cee98e9b12e9197d"
    ctr = op(
        Op.ENCRYPT, Alg.AES_CTR, PT, key=K16, iv=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    )
    assert bytes(ctr.output).hex() == "874d6191b620e3261bef6864990db6ce"
    gcm = op(Op.ENCRYPT, Alg.AES_GCM, bytes(16), key=bytes(16), iv=bytes(12), tag=16)
    assert bytes(gcm.output).hex() == (
        "0388dace60b6a392f328c2b971b2fe78ab6e47d42cec13bdf53a67b21257bddf"
    )
    assert bytes(op(Op.DIGEST, Alg.SHA256, b"abc").output).hex().startswith("ba7816bf8f01cfea")
    assert bytes(op(Op.DIGEST, Alg.SHA512, b"abc").output).hex().startswith("ddaf35a193617aba")
    mac = op(Op.DIGEST, Alg.HMAC_SHA256, b"Hi There", key=b"\x0b" * 20)
    assert bytes(mac.output).hex() == (
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
    )


@pytest.mark.parametrize("klen", [16, 24, 32])
def test_ciphers_vs_cryptography(klen: int) -> None:
    key, iv = os.urandom(klen), os.urandom(16)
    for alg, mode in ((Alg.AES_CBC, modes.CBC(iv)), (Alg.AES_CTR, modes.CTR(iv))):
        e = Cipher(algorithms.AES(key), mode).encryptor()
        want = e.update(DATA[:4096]) + e.finalize()
        got = op(Op.ENCRYPT, alg, DATA[:4096], key=key, iv=iv)
        assert got.status is Status.OK
        assert bytes(got.output) == want
        back = op(Op.DECRYPT, alg, want, key=key, iv=iv)
        assert bytes(back.output) == DATA[:4096]
    nonce = os.urandom(12)
    want = AESGCM(key).encrypt(nonce, DATA, b"hdr")
    got = op(Op.ENCRYPT, Alg.AES_GCM, DATA, key=key, iv=nonce, aad=b"hdr", tag=16)
    assert bytes(got.output) == want
    assert bytes(op(Op.DECRYPT, Alg.AES_GCM, want, key=key, iv=nonce, aad=b"hdr").output) == DATA


def test_xts_and_digests_vs_library() -> None:
    key, tweak = os.urandom(64), os.urandom(16)
    e = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
    want = e.update(DATA[:4096]) + e.finalize()
    assert bytes(op(Op.ENCRYPT, Alg.AES_XTS, DATA[:4096], key=key, iv=tweak).output) == want
    for alg, name in ((Alg.SHA256, "sha256"), (Alg.SHA512, "sha512")):
        assert bytes(op(Op.DIGEST, alg, DATA).output) == hashlib.new(name, DATA).digest()
    k = os.urandom(40)
    for alg, name in ((Alg.HMAC_SHA256, "sha256"), (Alg.HMAC_SHA512, "sha512")):
        got = op(Op.DIGEST, alg, DATA, key=k)
        assert bytes(got.output) == std_hmac.new(k, DATA, name).digest()


def test_per_request_errors() -> None:
    assert op(Op.ENCRYPT, Alg.AES_CBC, PT, key=b"short", iv=bytes(16)).status is Status.BAD_KEY
    assert op(Op.ENCRYPT, Alg.AES_CBC, PT[:5], key=K16, iv=bytes(16)).status is (
        Status.INVALID_REQUEST
    )
    ct = AESGCM(K16).encrypt(bytes(12), DATA, None)
    bad = ct[:-1] + bytes([ct[-1] ^ 1])
    assert op(Op.DECRYPT, Alg.AES_GCM, bad, key=K16, iv=bytes(12)).status is Status.AUTH_FAILED
    assert op(Op.DECOMPRESS, Alg.ZLIB, b"not zlib at all").status is Status.CORRUPT_INPUT
    trunc = zlib.compress(DATA)[:-10]
    assert op(Op.DECOMPRESS, Alg.ZLIB, trunc).status is Status.CORRUPT_INPUT
    assert op(Op.COMPRESS, Alg.ZLIB, DATA, cap=10).status is Status.OUT_OF_SPACE_TERMINATED
    assert op(Op.DECOMPRESS, Alg.ZLIB, zlib.compress(DATA), cap=100).status is (
        Status.OUT_OF_SPACE_TERMINATED
    )
    assert op(Op.COMPRESS, Alg.AES_CBC, DATA).status is Status.INVALID_REQUEST
    assert op(99, Alg.ZLIB, DATA).status is Status.INVALID_REQUEST  # type: ignore[arg-type]
    assert op(Op.INJECT, Alg.DEFLATE, b"").status is Status.UNSUPPORTED  # not allowed here
    only_zip = EngineConfig(frozenset({Alg.ZLIB}))
    r = run_op(only_zip, StreamTable(), Op.DIGEST, Alg.SHA256, 0, 0, 0, 0, b"", b"", 0,
               memoryview(b"x"), b"", 64)  # fmt: skip
    assert r.status is Status.UNSUPPORTED


def test_stream_compress_out_of_space_is_recoverable() -> None:
    st = StreamTable()
    src = os.urandom(20000)  # incompressible: output > cap
    r = op(Op.COMPRESS, Alg.GZIP, src, cap=4096, flags=ReqFlag.STREAM | ReqFlag.FINISH, streams=st)
    assert r.status is Status.OUT_OF_SPACE_RECOVERABLE
    assert r.consumed == len(src)
    out = bytes(r.output)
    while r.status is Status.OUT_OF_SPACE_RECOVERABLE:
        r = op(
            Op.COMPRESS, Alg.GZIP, b"", cap=4096, flags=ReqFlag.STREAM | ReqFlag.FINISH, streams=st
        )
        out += bytes(r.output)
    assert r.status is Status.OK
    assert zlib.decompress(out, 31) == src
    assert not st.streams


def test_stream_decompress_resumes_with_consumed() -> None:
    st = StreamTable()
    comp = zlib.compress(DATA * 4)
    out, rest = b"", comp
    while True:
        r = op(Op.DECOMPRESS, Alg.ZLIB, rest, cap=5000, flags=ReqFlag.STREAM, streams=st)
        out += bytes(r.output)
        rest = rest[r.consumed :]
        if r.status is Status.OK:
            break
        assert r.status is Status.OUT_OF_SPACE_RECOVERABLE
    assert out == DATA * 4


def test_chaining_equals_steps_by_hand() -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    r = op(Op.COMPRESS_ENCRYPT, Alg.DEFLATE, DATA, alg2=Alg.AES_GCM, key=key, iv=nonce, level=1)
    by_hand = AESGCM(key).encrypt(nonce, zlib.compress(DATA, 1, -15), None)
    assert r.status is Status.OK
    assert bytes(r.output) == by_hand
    back = op(Op.DECRYPT_DECOMPRESS, Alg.DEFLATE, by_hand, alg2=Alg.AES_GCM, key=key, iv=nonce)
    assert back.status is Status.OK
    assert bytes(back.output) == DATA


def test_soft_compute_matches_library() -> None:
    assert compute(SessionSpec("gzip", level=9), DATA) == zlib.compress(DATA, 9, 31)


def _pair() -> tuple[QueueGeometry, memoryview, DriverQueue[int], QueueServer]:
    geo = QueueGeometry(1, 64 << 10)
    whole = memoryview(bytearray(geo.region_size))
    mem = FlatMemory(whole, base=geo.base)
    data = FlatMemory(whole[geo.heap_off :], base=geo.heap_addr)
    drv: DriverQueue[int] = DriverQueue(mem, geo.layout, 0)
    return geo, whole, drv, QueueServer(mem, geo.layout, data, ALL)


def test_queue_server_answers_in_the_request_slot() -> None:
    geo, whole, drv, srv = _pair()
    src = geo.heap_addr
    whole[geo.heap_off : geo.heap_off + 3] = b"abc"
    hdr = geo.slot_addr(5) - geo.base
    REQ_STRUCT.pack_into(
        whole, hdr, WIRE_VERSION, Op.DIGEST, Alg.SHA256, 0, 0, 0, 0, 0, 0, 0,
        src, 3, 64, src + 4096, 0, 0, b"", b"",
    )  # fmt: skip
    drv.add((), [(geo.slot_addr(5), SLOT_SIZE)], 1)  # one device-writable descriptor
    drv.publish()
    assert srv.serve(lambda: 0) == (1, True)
    assert drv.get_used() == (1, SLOT_SIZE)
    st, consumed, produced, _, _ = RESP_STRUCT.unpack_from(whole, hdr + RESP_OFF)
    assert (Status(st), consumed, produced) == (Status.OK, 3, 32)
    out = geo.heap_off + 4096
    assert bytes(whole[out : out + 32]) == hashlib.sha256(b"abc").digest()


def test_queue_server_refuses_what_is_not_a_slot_without_breaking_the_ring() -> None:
    geo, whole, drv, srv = _pair()
    slot = geo.slot_addr(0)
    drv.add((), [(slot, SLOT_SIZE - 1)], 1)  # too short to hold the response
    drv.add([(slot, REQ_STRUCT.size)], [(slot + RESP_OFF, 32)], 2)  # the v1 two-buffer chain
    drv.publish()
    assert srv.serve(lambda: 0) == (2, True)
    assert drv.get_used_many() == [(1, 0), (2, 0)]  # unanswered: the app reports INVALID_REQUEST
    assert srv.words[StatusWord.ERRORS] == 2
    REQ_STRUCT.pack_into(whole, slot - geo.base, WIRE_VERSION, *[0] * 15, b"", b"")  # a NOP
    drv.add((), [(slot, SLOT_SIZE)], 3)
    drv.publish()
    assert srv.serve(lambda: 0) == (1, True)
    assert drv.get_used() == (3, SLOT_SIZE)
