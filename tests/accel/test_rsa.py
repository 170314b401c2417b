"""RSA in the security engine: sign/verify (PSS, PKCS#1 v1.5) and OAEP against ``cryptography``.

PKCS#1 v1.5 signatures are deterministic, so the engine's must equal the
library's byte for byte (a known answer for the key); PSS and OAEP are
randomised, so they are checked in both directions (engine -> library and
library -> engine). The key travels as DER in the request's key buffer.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from mic_card.accel import AccelFramework, RequestError, Status
from mic_card.accel.engine import EngineConfig, StreamTable, run_op
from mic_card.accel.providers.soft import compute
from mic_card.accel.session import SessionSpec
from mic_card.accel.wire import Alg, Op
from virtio.errors import LocalProtocolError

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PRIV = KEY.private_bytes(
    serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
PUB = KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
MSG = b"sign me on the card " * 50
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
ALL = EngineConfig(frozenset(Alg) - {Alg.NONE})


def rsa_op(o: Op, a: Alg, src: bytes, key: bytes, cap: int = 512):  # type: ignore[no-untyped-def]
    return run_op(ALL, StreamTable(), o, a, 0, 0, 0, 0, b"", b"", 0, memoryview(src), key, cap)


def test_pkcs1v15_signature_is_the_library_signature() -> None:
    sig = compute(SessionSpec("rsa-pkcs1v15", key=PRIV), MSG)
    assert sig == KEY.sign(MSG, padding.PKCS1v15(), hashes.SHA256())
    assert compute(SessionSpec("rsa-pkcs1v15", op="verify", key=PUB), sig + MSG) == b""


def test_pss_both_directions() -> None:
    sig = compute(SessionSpec("rsa-pss", key=PRIV), MSG)
    KEY.public_key().verify(sig, MSG, PSS, hashes.SHA256())  # raises if wrong
    lib = KEY.sign(MSG, PSS, hashes.SHA256())
    assert compute(SessionSpec("rsa-pss", op="verify", key=PUB), lib + MSG) == b""
    # the private key verifies too (its public half is used)
    assert rsa_op(Op.VERIFY, Alg.RSA_PSS, lib + MSG, PRIV).status is Status.OK
    bad = bytearray(lib)
    bad[5] ^= 1
    assert rsa_op(Op.VERIFY, Alg.RSA_PSS, bytes(bad) + MSG, PUB).status is Status.AUTH_FAILED
    assert rsa_op(Op.VERIFY, Alg.RSA_PSS, lib + MSG + b"!", PUB).status is Status.AUTH_FAILED


def test_oaep_both_directions() -> None:
    ct = compute(SessionSpec("rsa-oaep", key=PUB), b"a session key!!!")
    assert len(ct) == 256
    assert KEY.decrypt(ct, OAEP) == b"a session key!!!"
    lib = KEY.public_key().encrypt(b"from the library", OAEP)
    assert compute(SessionSpec("rsa-oaep", op="decrypt", key=PRIV), lib) == b"from the library"
    tampered = bytes([lib[0] ^ 1]) + lib[1:]
    assert rsa_op(Op.DECRYPT, Alg.RSA_OAEP, tampered, PRIV).status is Status.CORRUPT_INPUT


def test_rsa_per_request_errors() -> None:
    assert rsa_op(Op.SIGN, Alg.RSA_PSS, MSG, PUB).status is Status.BAD_KEY  # public cannot sign
    assert rsa_op(Op.DECRYPT, Alg.RSA_OAEP, b"x" * 256, PUB).status is Status.BAD_KEY
    assert rsa_op(Op.SIGN, Alg.RSA_PSS, MSG, b"not a key").status is Status.BAD_KEY
    assert rsa_op(Op.SIGN, Alg.RSA_PSS, MSG, b"").status is Status.BAD_KEY
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert rsa_op(Op.SIGN, Alg.RSA_PSS, MSG, ec_key).status is Status.BAD_KEY  # not RSA
    too_long = rsa_op(Op.ENCRYPT, Alg.RSA_OAEP, b"x" * 300, PUB)
    assert too_long.status is Status.INVALID_REQUEST
    assert rsa_op(Op.VERIFY, Alg.RSA_PSS, b"short", PUB).status is Status.INVALID_REQUEST
    assert rsa_op(Op.SIGN, Alg.RSA_PSS, MSG, PRIV, cap=100).status is (
        Status.OUT_OF_SPACE_TERMINATED
    )
    assert rsa_op(Op.ENCRYPT, Alg.RSA_PSS, MSG, PRIV).status is Status.INVALID_REQUEST
    assert rsa_op(Op.SIGN, Alg.AES_CBC, MSG, PRIV).status is Status.INVALID_REQUEST
    for alg, op in (("rsa-pss", "encrypt"), ("rsa-oaep", "sign"), ("aes-gcm", "verify")):
        with pytest.raises(LocalProtocolError):
            SessionSpec(alg, op=op).resolved()


@pytest.mark.asyncio(loop_scope="module")
async def test_rsa_through_the_engine_workers(fw: AccelFramework) -> None:
    assert fw.device("mic-sec").supports("rsa-pss")
    signer = await fw.open_session("rsa-pkcs1v15", key=PRIV)
    assert signer.provider == "mic"
    sig = bytes(await signer.do(MSG))
    assert sig == KEY.sign(MSG, padding.PKCS1v15(), hashes.SHA256())
    verifier = await fw.open_session("rsa-pkcs1v15", op="verify", key=PUB)
    assert bytes(await verifier.do(sig + MSG)) == b""
    with pytest.raises(RequestError) as e:
        await verifier.do(sig + MSG[:-1])
    assert e.value.status is Status.AUTH_FAILED
    enc = await fw.open_session("rsa-oaep", key=PUB)
    ct = bytes(await enc.do(b"wrapped key"))
    assert KEY.decrypt(ct, OAEP) == b"wrapped key"
    dec = await fw.open_session("rsa-oaep", op="decrypt", key=PRIV)
    assert bytes(await dec.do(ct)) == b"wrapped key"
