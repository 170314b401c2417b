"""``micctl``'s entry point: build the parser from the registry, run one subcommand.

Exit codes: 0 success, 1 the operation failed (or no daemon), 2 usage error,
130 interrupted. Every failure prints exactly one line ``micctl: <reason>``
on stderr (``run`` of an app that raised prints its card-side traceback
first). Imports the registry and the modules that fill it (built-in
commands, card apps, console and exec), and the client's :func:`~mic_host.client.connect`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

# imported for their registrations: card apps, the built-in subcommands, console,
# devices, exec, reboot, events, vhost-user; and help and completion (which list the others
# when the parser is built)
import mic_host.micctl.apps
import mic_host.micctl.commands
import mic_host.micctl.console
import mic_host.micctl.devices
import mic_host.micctl.events
import mic_host.micctl.execute
import mic_host.micctl.help
import mic_host.micctl.reboot
import mic_host.micctl.vhost_user  # noqa: F401
from mic_host.client.connection import connect
from mic_host.micctl.registry import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PIPE,
    EXIT_USAGE,
    PROG,
    SUBCOMMANDS,
    Parser,
    Run,
    UsageError,
)
from mic_host.paths import STATE_DIR_ENV, resolve_state_dir
from mic_host.version import package_version
from virtio.errors import MicError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every registered subcommand."""
    parser = Parser(
        prog=PROG,
        description="Control a running mic-host daemon: its cards, their devices, "
        "consoles and shells.",
        epilog=f"The state directory is --state-dir, else ${STATE_DIR_ENV}, "
        "else ~/.local/state/mic-vop (the daemon's default too). "
        f"'{PROG} COMMAND --help' shows a command's options; '{PROG} help' lists "
        "topics (config, devices, apps, exec, console, images).",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"the daemon's state directory (default: ${STATE_DIR_ENV} or ~/.local/state/mic-vop)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.set_defaults(_parser=parser)  # for help and completion, which read the parser
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # the commands that need no daemon (help, completion) last
    for sub in sorted(SUBCOMMANDS.values(), key=lambda s: s.local is not None):
        sp = subs.add_parser(sub.name, help=sub.help, description=sub.help)
        sub.configure(sp)
        sp.set_defaults(_run=sub.run, _validate=sub.validate, _local=sub.local)
    return parser


async def _main(args: argparse.Namespace) -> int:
    run: Run = args._run
    async with connect(resolve_state_dir(args.state_dir)) as client:
        return await run(client, args)


def _one_line(e: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def _pipe_closed() -> int:
    """stdout's reader went away: exit quietly with 141 (128 + SIGPIPE), as a shell
    pipeline expects. stdout now points at /dev/null so that the interpreter's
    own flush at exit cannot raise again (Python's documented recipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``micctl`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args._validate is not None:
            args._validate(args)
    except UsageError as e:
        print(f"{PROG}: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    try:
        if args._local is not None:  # help, completion: no daemon needed
            return int(args._local(args))
        return asyncio.run(_main(args))
    except BrokenPipeError:  # `micctl stats mic0 | head`: the reader left
        return _pipe_closed()
    except UsageError as e:
        print(f"{PROG}: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except MicError as e:
        print(f"{PROG}: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
