"""``micctl exec`` with stdin and ``--shell`` through real processes (``mic-host``,
``mic-card``, ``micctl``), and the card shell's line grammar (pipes, lists) on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
from pathlib import Path

import pytest

from mic_card.shell.base import ShellError
from mic_card.shell.line import Op, parse, tokenize
from tests.integration.helpers import REPO, booted, command, config, daemon, micctl
from virtio.agent import MAX_STDIN


async def micctl_in(state_dir: Path, *args: str, stdin: bytes | int) -> tuple[int, bytes, bytes]:
    """``micctl`` with ``stdin`` bytes on a pipe, or an open fd (a pty) as its stdin."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mic_host.micctl", "--state-dir", str(state_dir), *args,
        stdin=asyncio.subprocess.PIPE if isinstance(stdin, bytes) else stdin,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await proc.communicate(stdin if isinstance(stdin, bytes) else None)
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.mark.asyncio
async def test_exec_stdin_and_shell_lines(state_dir: Path) -> None:
    async with daemon(state_dir, config()) as client:
        await booted(client)

        # stdin from a pipe reaches the command (it used to be dropped)
        assert await micctl_in(state_dir, "exec", "mic0", "--", "cat", stdin=b"hi\n") == (
            0, b"hi\n", b"",
        )  # fmt: skip
        blob = os.urandom(300 * 1024)
        rc, out, err = await micctl_in(state_dir, "exec", "mic0", "--", "sha256sum", stdin=blob)
        assert (rc, err) == (0, b""), err
        assert out == f"{hashlib.sha256(blob).hexdigest()}  -\n".encode()
        # --no-stdin (-n) leaves it unread, as ssh -n
        assert await micctl_in(state_dir, "exec", "mic0", "-n", "--", "cat", stdin=b"x") == (
            0, b"", b"",
        )  # fmt: skip
        # over the bound: one clear line, exit 1, nothing run
        rc, out, err = await micctl_in(
            state_dir, "exec", "mic0", "--shell", "cat > /tmp/big", stdin=b"z" * (MAX_STDIN + 1)
        )
        assert (rc, out) == (1, b""), err
        assert err.decode().splitlines() == [
            f"micctl: exec: stdin is larger than {MAX_STDIN // 1024} KiB, the bound of one exec "
            "(for bulk data attach a block image instead)"
        ]
        rc, out, _ = await micctl_in(state_dir, "exec", "mic0", "--", "ls", "/tmp", stdin=b"")
        assert b"big" not in out
        # exactly the bound is fine
        rc, out, err = await micctl_in(
            state_dir, "exec", "mic0", "--", "sha256sum", stdin=b"z" * MAX_STDIN
        )
        assert (rc, out.split()[0]) == (0, hashlib.sha256(b"z" * MAX_STDIN).hexdigest().encode())

        # stdin closed (<&-): nothing to send, and none of micctl's own fds is read instead
        line = 'exec "$0" -m mic_host.micctl --state-dir "$1" exec mic0 -- cat <&-'
        r = await command("sh", "-c", line, sys.executable, str(state_dir))
        assert (r.rc, r.out, r.err) == (0, "", ""), r

        # stdin on a terminal is not read unless asked (-i/--stdin): no hang, empty stdin
        master, slave = os.openpty()
        try:
            assert await micctl_in(state_dir, "exec", "mic0", "--", "cat", stdin=slave) == (
                0, b"", b"",
            )  # fmt: skip
            os.write(master, b"typed\n\x04")  # a line, then Ctrl-D (end of file)
            rc, out, err = await micctl_in(
                state_dir, "exec", "mic0", "-i", "--", "cat", stdin=slave
            )
            assert (rc, out, err) == (0, b"typed\n", b"")
        finally:
            os.close(slave)
            os.close(master)

        # --shell: a line for the card shell, with redirections, pipes and lists
        r = await micctl(state_dir, "exec", "mic0", "--shell", "echo a > /tmp/q")
        assert (r.rc, r.out, r.err) == (0, "", ""), r
        r = await micctl(state_dir, "exec", "mic0", "--", "cat", "/tmp/q")
        assert (r.rc, r.out) == (0, "a\n"), r
        r = await micctl(state_dir, "exec", "mic0", "--shell=echo b >> /tmp/q; cat /tmp/q")
        assert (r.rc, r.out) == (0, "a\nb\n"), r
        r = await micctl(
            state_dir, "exec", "mic0", "--shell", "false && echo no || echo 'yes | no' | cat"
        )
        assert (r.rc, r.out) == (0, "yes | no\n"), r
        r = await micctl(state_dir, "exec", "mic0", "--shell", "cat < /tmp/q | sha256sum")
        digest = hashlib.sha256(b"a\nb\n").hexdigest()
        assert r.out == f"{digest}  -\n", r
        rc, out, err = await micctl_in(
            state_dir, "exec", "mic0", "--shell", "cat > /tmp/in && cat /tmp/in /tmp/in",
            stdin=b"piped\n",
        )  # fmt: skip
        assert (rc, out, err) == (0, b"piped\npiped\n", b"")
        # statuses as for argv: the last command's, 127, 2 for a syntax error
        r = await micctl(state_dir, "exec", "mic0", "--shell", "true; exit 3")
        assert r.rc == 3, r
        r = await micctl(state_dir, "exec", "mic0", "--shell", "frob | cat")
        assert (r.rc, r.err) == (0, "sh: frob: command not found\n"), r
        r = await micctl(state_dir, "exec", "mic0", "--shell", "cat | frob")
        assert (r.rc, r.err) == (127, "sh: frob: command not found\n"), r
        r = await micctl(state_dir, "exec", "mic0", "--shell", "echo a |")
        assert (r.rc, r.err) == (2, "sh: syntax error near unexpected token 'newline'\n"), r
        r = await micctl(state_dir, "exec", "mic0", "--shell", "cat < /nope")
        assert (r.rc, r.err) == (1, "sh: /nope: No such file or directory\n"), r

        # usage errors: both forms, neither, an empty line, contradicting flags
        for args in (
            ("--shell", "echo a", "--", "echo", "b"),
            ("--shell", "  "),
            ("-i", "-n", "--", "cat"),
            ("--frob", "cat"),
        ):
            r = await micctl(state_dir, "exec", "mic0", *args)
            assert r.rc == 2, (args, r)
            assert len(r.err.splitlines()) == 1, r
            assert r.err.startswith("micctl: "), r


def test_line_grammar() -> None:
    assert tokenize("""a 'b c' "d \\" e" f\\ g h#i # comment""") == [
        "a", "b c", 'd " e', "f g", "h#i",
    ]  # fmt: skip
    assert tokenize("a>>b|c&&d||e;f<g") == [
        "a", Op(">>"), "b", Op("|"), "c", Op("&&"), "d", Op("||"), "e", Op(";"), "f", Op("<"), "g",
    ]  # fmt: skip
    assert tokenize("echo '|' \"&&\"") == ["echo", "|", "&&"]  # quoted: words, not operators
    assert tokenize("echo ''") == ["echo", ""]

    cl = parse("a x | b > f; c && d < g || e >> h")
    assert cl.first is not None
    assert [c.argv for c in cl.first.commands] == [["a", "x"], ["b"]]
    assert cl.first.commands[1].stdout == ("f", False)
    assert [(conn, [c.argv for c in p.commands]) for conn, p in cl.rest] == [
        (";", [["c"]]), ("&&", [["d"]]), ("||", [["e"]]),
    ]  # fmt: skip
    assert cl.rest[1][1].commands[0].stdin == "g"
    assert cl.rest[2][1].commands[0].stdout == ("h", True)
    assert parse("   ").first is None
    assert parse("# only a comment").first is None
    assert parse("a;").rest == []

    for bad, near in [
        ("| a", "|"), ("a |", "newline"), ("a &&", "newline"), ("a ; ; b", ";"),
        ("a >", "newline"), ("a > | b", "|"), ("a || || b", "||"),
    ]:  # fmt: skip
        with pytest.raises(ShellError, match=f"near unexpected token '{re.escape(near)}'") as e:
            parse(bad)
        assert e.value.status == 2
    for bad in ("a &", "echo 'x", 'echo "x', "echo x\\"):
        with pytest.raises(ShellError, match="syntax error") as e:
            parse(bad)
        assert e.value.status == 2
