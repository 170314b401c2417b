"""Fuzz the link framing over a real socket pair (:class:`transport.link.FramedSocket`
and the :class:`MessageLink` reader on top of it).

The peer writes arbitrary bytes — length headers that lie, frames cut short,
bodies that are not JSON objects — and closes. The reader must hand out only
dict frames, then end with :class:`LinkLost` (EOF) or
:class:`RemoteProtocolError` (a bad frame); the message link's reader task
must return, not raise, and mark the link lost.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.strategies import FUZZ_IO, JSON, RAW_TEXTS, dumps
from transport.errors import LinkLost
from transport.link import FramedSocket, MessageLink
from virtio.errors import RemoteProtocolError

MAX = 4096  # a small bound, so oversized headers are cheap to reach


def frame(body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">I", len(body) if length is None else length) + body


FRAMES = st.one_of(
    st.binary(max_size=64).map(frame),
    JSON.map(lambda v: frame(dumps(v).encode())),
    RAW_TEXTS.map(lambda t: frame(t.encode("utf-8", "surrogatepass")[:MAX])),
    st.builds(
        frame,
        st.binary(max_size=32),
        st.sampled_from([0, 1, 3, MAX, MAX + 1, 2**31, 2**32 - 1]),
    ),
    st.binary(min_size=1, max_size=3),  # a header cut short
)
STREAMS = st.lists(FRAMES, max_size=6).map(b"".join)


async def _feed(data: bytes) -> tuple[int, BaseException]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fs = FramedSocket(b, max_message=MAX)
    try:
        a.setblocking(False)
        writer = asyncio.get_running_loop().sock_sendall(a, data)
        sending = asyncio.ensure_future(writer)
        sending.add_done_callback(lambda _: a.close())
        frames = 0
        while True:
            try:
                msg, fds = await fs.recv_frame()
            except (LinkLost, RemoteProtocolError) as e:
                sending.cancel()
                return frames, e
            assert isinstance(msg, dict)
            assert fds == []
            frames += 1
    finally:
        fs.close()
        a.close()


@FUZZ_IO
@given(STREAMS)
@example(frame(b"[" * 3000))
@example(frame(b'{"a":1}') + frame(b"", 2**32 - 1))
def test_framed_socket_ends_with_link_lost_or_protocol_error(data: bytes) -> None:
    frames, err = asyncio.run(_feed(data))
    assert frames <= len(data) // 6
    assert isinstance(err, LinkLost | RemoteProtocolError)


async def _link(data: bytes) -> tuple[int, LinkLost | None]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = MessageLink(FramedSocket(b, max_message=MAX))
    try:
        a.setblocking(False)
        sending = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(a, data))
        sending.add_done_callback(lambda _: a.close())
        async with asyncio.timeout(10):
            await link.run()  # returns (never raises) once the link is lost
        sending.cancel()
        got = 0
        while True:
            try:
                link.recv_nowait()
            except LinkLost:
                break
            got += 1
        return got, link.error
    finally:
        link.close()
        a.close()


@FUZZ_IO
@given(STREAMS)
def test_message_link_reader_never_raises(data: bytes) -> None:
    got, err = asyncio.run(_link(data))
    assert isinstance(err, LinkLost)
    assert got <= len(data) // 6
