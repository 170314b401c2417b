"""``micctl exec``: run a card-shell command through the agent, with stdin; exit with its status.

``micctl exec CARD [OPTIONS] [--] CMD [ARGS...]`` runs an argv;
``micctl exec CARD --shell LINE`` hands a whole command line to the card
shell (redirections, pipes, ``;``, ``&&``, ``||`` as ``mic_card/shell``
parses them). This process's stdin is read whole (at most
:data:`virtio.agent.MAX_STDIN` bytes) and becomes the command's stdin when it
is not a terminal, or always with ``--stdin``; ``--no-stdin`` never reads it
(as ``ssh -n``). Registered at import; imports the client library, the
registry and ``virtio.agent`` (the bound) only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from mic_host.client.connection import Client
from mic_host.micctl.registry import (
    EXIT_USAGE,
    Subcommand,
    UsageError,
    register_subcommand,
    seconds,
    with_card,
)
from virtio.agent import MAX_STDIN
from virtio.errors import LocalProtocolError

__all__ = ["read_stdin"]

_VALUED = {"--timeout": "timeout", "--shell": "shell"}
_FLAGS = {"-i": "stdin", "--stdin": "stdin", "-n": "no_stdin", "--no-stdin": "no_stdin"}


def _conf_exec(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument(
        "--timeout", type=seconds, metavar="S", help="stop the command after S s (default 30)"
    )
    p.add_argument(
        "--shell",
        metavar="LINE",
        help="run LINE on the card shell (redirections >, >>, pipes |, ;, &&, ||) "
        "instead of CMD [ARGS...]",
    )
    p.add_argument(
        "-i",
        "--stdin",
        action="store_true",
        help="send stdin even when it is a terminal (read until end of file, Ctrl-D)",
    )
    p.add_argument(
        "-n",
        "--no-stdin",
        action="store_true",
        help="never read stdin (default: sent when it is not a terminal)",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, action=_ArgvAction,
                   metavar="-- CMD [ARGS...]", help="the shell command to run")  # fmt: skip
    p.epilog = (
        f"stdin (when sent) is read whole, at most {MAX_STDIN // 1024} KiB. "
        "Exit status: the command's; 124 timed out; 127 command not found."
    )


class _ArgvAction(argparse.Action):
    """``[OPTIONS] [--] CMD [ARGS...]``: the options before the command, then argv."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        argv = list(values or [])
        # REMAINDER takes everything after CARD, options included: pick ours off
        # the front, up to "--" or the command (argparse cannot, see bpo-17050).
        while argv and argv[0].startswith("-") and argv[0] != "--":
            key, eq, value = argv.pop(0).partition("=")
            if key in _FLAGS and not eq:
                setattr(namespace, _FLAGS[key], True)
                continue
            if key not in _VALUED:
                parser.error(f"unrecognized option {key!r} (put the command after '--')")
            if not eq:
                if not argv:
                    parser.error(f"{key} needs a value")
                value = argv.pop(0)
            if key == "--timeout":
                try:
                    namespace.timeout = seconds(value)
                except argparse.ArgumentTypeError as e:
                    parser.error(f"--timeout: {e}")
            else:
                namespace.shell = value
        if argv and argv[0] == "--":
            argv = argv[1:]
        setattr(namespace, self.dest, argv)


def _validate(args: argparse.Namespace) -> None:
    if args.stdin and args.no_stdin:
        raise UsageError("exec: --stdin and --no-stdin contradict each other")
    if args.shell is not None and args.argv:
        raise UsageError("exec: give either --shell LINE or CMD [ARGS...], not both")
    if args.shell is None and not args.argv:
        raise UsageError("exec needs a command: micctl exec CARD -- CMD [ARGS...]")
    if args.shell is not None and not args.shell.strip():
        raise UsageError("exec: --shell needs a non-empty command line")


def read_stdin(fd: int = 0, *, force: bool = False, limit: int = MAX_STDIN) -> bytes | None:
    """What to send as the command's stdin: ``None`` when ``fd`` is a terminal
    (unless ``force``) or not open, else everything up to end of file.

    Raises:
        LocalProtocolError: more than ``limit`` bytes (nothing is sent).
    """
    try:
        if os.isatty(fd) and not force:
            return None
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            data = os.read(fd, min(1 << 16, limit + 1 - total))
            if not data:
                break
            chunks.append(data)
            total += len(data)
    except OSError:  # fd 0 closed (``<&-``): no stdin
        return None
    if total > limit:
        raise LocalProtocolError(
            f"exec: stdin is larger than {limit // 1024} KiB, the bound of one exec "
            "(for bulk data attach a block image instead)"
        )
    return b"".join(chunks)


async def _exec(client: Client, args: argparse.Namespace) -> int:
    if args.shell is None and not args.argv:  # validate() ran; kept for direct callers
        return EXIT_USAGE
    stdin = None
    # sys.stdin is None when fd 0 was closed at startup: fd 0 may since be one of
    # our own sockets, never to be read as the user's input
    if not args.no_stdin and sys.stdin is not None:
        stdin = await asyncio.to_thread(read_stdin, sys.stdin.fileno(), force=args.stdin)
    card = client.card(args.card)
    if args.shell is not None:
        r = await card.exec(line=args.shell, timeout=args.timeout, stdin=stdin)
    else:
        r = await card.exec(*args.argv, timeout=args.timeout, stdin=stdin)
    sys.stdout.buffer.write(r.stdout)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(r.stderr)
    if r.truncated:
        sys.stderr.buffer.write(b"micctl: output truncated\n")
    sys.stderr.buffer.flush()
    return r.status & 0xFF


register_subcommand(
    Subcommand(
        "exec",
        "run a shell command (or --shell LINE) on a card, with stdin; exits with its status",
        _conf_exec,
        _exec,
        validate=_validate,
    )
)
