"""``micctl console`` and ``micctl exec``: a card's console and shell from the command line.

``console`` relays this terminal to the card console's pty
(:func:`mic_host.client.terminal.attach`); ``exec`` runs a shell command
through the card agent and exits with its status. Registered at import;
imports the client library and the registry only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mic_host.client.connection import Client
from mic_host.client.terminal import attach
from mic_host.micctl.registry import Subcommand, register_subcommand, seconds, with_card

__all__: list[str] = []


def _conf_console(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument("--device", metavar="NAME", help="console device (default: the first)")
    p.add_argument(
        "--print-path", action="store_true", help="print the console's pty path and exit"
    )


async def _console(client: Client, args: argparse.Namespace) -> int:
    card = client.card(args.card)
    path = await card.console_path(args.device)
    if args.print_path:
        print(path)
        return 0

    async def resize(cols: int, rows: int) -> None:
        await card.console_resize(cols, rows, args.device)

    return await attach(card.name, path, resize)


def _conf_exec(p: argparse.ArgumentParser) -> None:
    with_card(p)
    p.add_argument(
        "--timeout", type=seconds, metavar="S", help="stop the command after S s (default 30)"
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, action=_ArgvAction,
                   metavar="-- CMD [ARGS...]", help="the shell command to run")  # fmt: skip


class _ArgvAction(argparse.Action):
    """``[--timeout S] [--] CMD [ARGS...]``: the options before the command, then argv."""

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
        while argv and argv[0].startswith("--") and argv[0] != "--":
            key, eq, value = argv.pop(0).partition("=")
            if key != "--timeout":
                parser.error(f"unrecognized option {key!r} (put the command after '--')")
            if not eq:
                if not argv:
                    parser.error("--timeout needs a value")
                value = argv.pop(0)
            try:
                namespace.timeout = seconds(value)
            except argparse.ArgumentTypeError as e:
                parser.error(f"--timeout: {e}")
        if argv and argv[0] == "--":
            argv = argv[1:]
        setattr(namespace, self.dest, argv)


async def _exec(client: Client, args: argparse.Namespace) -> int:
    if not args.argv:
        print("micctl: exec needs a command: micctl exec CARD -- CMD [ARGS...]", file=sys.stderr)
        return 2
    r = await client.card(args.card).exec(*args.argv, timeout=args.timeout)
    sys.stdout.buffer.write(r.stdout)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(r.stderr)
    if r.truncated:
        sys.stderr.buffer.write(b"micctl: output truncated\n")
    sys.stderr.buffer.flush()
    return r.status & 0xFF


register_subcommand(
    Subcommand(
        "console",
        "attach this terminal to a card console (Ctrl-] detaches)",
        _conf_console,
        _console,
    )
)
register_subcommand(
    Subcommand("exec", "run a shell command on a card; exits with its status", _conf_exec, _exec)
)
