"""The agent's wire format (virtio/agent.py), shared by the card agent and the host client."""

from __future__ import annotations

import pytest

from virtio import agent as A
from virtio.errors import RemoteProtocolError


def test_lines_are_split_across_chunks_and_blank_lines_dropped() -> None:
    s = A.LineSplitter()
    assert s.feed(b'{"id":1}\n\n  \n{"id"') == ([b'{"id":1}'], False)
    assert s.feed(b":2}\n") == ([b'{"id":2}'], False)


def test_an_overlong_line_is_discarded_to_its_newline_and_reported_once() -> None:
    s = A.LineSplitter(max_line=8)
    assert s.feed(b"0123456789") == ([], True)
    assert s.feed(b"more of it") == ([], True)
    assert s.feed(b"tail\n{}\n") == ([b"{}"], False)
    assert s.overflows == 2


def test_encode_decode_round_trip_and_rejects() -> None:
    assert A.decode(A.encode({"id": 1, "op": "ping"})[:-1]) == {"id": 1, "op": "ping"}
    for bad in (b"\xff", b"[1, 2]", b"{", b"[" * 100_000):
        with pytest.raises(RemoteProtocolError):
            A.decode(bad)


@pytest.mark.parametrize(
    ("argv", "line", "timeout", "max_output", "word"),
    [
        (None, None, None, None, "exactly one"),
        (["ls"], "ls", None, None, "exactly one"),
        ([], None, None, None, "argv"),
        (["ls", 1], None, None, None, "argv"),
        (None, 7, None, None, "line"),
        (["ls"], None, 0, None, "timeout"),
        (["ls"], None, A.MAX_TIMEOUT + 1, None, "timeout"),
        (["ls"], None, True, None, "timeout"),
        (["ls"], None, None, -1, "max_output"),
        (["ls"], None, None, 1.5, "max_output"),
        (["ls"], None, None, A.MAX_OUTPUT + 1, "max_output"),
    ],
)
def test_exec_problems_are_named(
    argv: object, line: object, timeout: object, max_output: object, word: str
) -> None:
    problem = A.exec_problem(argv, line, timeout, max_output)
    assert problem is not None
    assert word in problem


def test_good_exec_arguments_pass() -> None:
    assert A.exec_problem(["ls", "/"], None, 2.5, 1024) is None
    assert A.exec_problem(None, "echo hi > /tmp/x", None, None) is None
    assert A.exec_problem(["ls"], None, A.MAX_TIMEOUT, float(A.MAX_OUTPUT)) is None
