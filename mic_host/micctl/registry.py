"""``micctl``'s frame: the subcommand registry, exit codes, usage errors, shared arguments.

:data:`SUBCOMMANDS` holds every subcommand (:class:`Subcommand`: how to parse
it, what to run with a connected client); :mod:`mic_host.micctl.commands` and
:mod:`mic_host.micctl.console` register theirs, and later features add theirs
with :func:`register_subcommand`. Imports the client library's
:class:`~mic_host.client.connection.Client` (the type a subcommand runs with)
and ``mic_host.config`` (card names, sizes); never the daemon side.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

from mic_host.client.connection import Client
from mic_host.config import CARD_NAME_RE, parse_size
from virtio.errors import ConfigError

__all__ = [
    "PROG",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "EXIT_PIPE",
    "SUBCOMMANDS",
    "Parser",
    "Run",
    "Subcommand",
    "UsageError",
    "card_name",
    "local_subcommand",
    "positive_int",
    "register_subcommand",
    "seconds",
    "size",
    "with_card",
    "with_timeout",
]

PROG = "micctl"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: stdout's reader went away (128 + SIGPIPE), as a shell pipeline expects
EXIT_PIPE = 141


class UsageError(Exception):
    """A bad command line (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so ``main`` prints one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


Run = Callable[[Client, argparse.Namespace], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Subcommand:
    """One ``micctl`` subcommand: how to parse it and what to run with a connected client."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Run
    #: checks across arguments before connecting; raises UsageError (exit 2)
    validate: Callable[[argparse.Namespace], object] | None = None
    #: set for subcommands that need no daemon (``help``, ``completion``): ``main``
    #: calls it instead of connecting (see :func:`local_subcommand`)
    local: Callable[[argparse.Namespace], int] | None = None


def local_subcommand(
    name: str,
    help: str,  # noqa: A002 - as argparse's add_parser(help=...)
    configure: Callable[[argparse.ArgumentParser], None],
    fn: Callable[[argparse.Namespace], int],
) -> Subcommand:
    """A :class:`Subcommand` that runs without connecting to a daemon."""

    async def run(client: Client, args: argparse.Namespace) -> int:
        return fn(args)

    return Subcommand(name, help, configure, run, local=fn)


#: name -> subcommand, in ``--help`` order. Extend with :func:`register_subcommand`.
SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(sub: Subcommand, *, replace: bool = False) -> None:
    """Add a subcommand (e.g. ``console`` from a later feature).

    Raises:
        ValueError: the name is taken and ``replace`` is false.
    """
    if sub.name in SUBCOMMANDS and not replace:
        raise ValueError(f"micctl subcommand {sub.name!r} is already registered")
    SUBCOMMANDS[sub.name] = sub


# ---------------------------------------------------------- argument types


def seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return v


def size(text: str) -> int:
    try:
        n = parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return n


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return n


def card_name(text: str) -> str:
    if not CARD_NAME_RE.match(text):
        raise argparse.ArgumentTypeError(f"bad card name {text!r}: expected micN, e.g. mic0")
    return text


def with_card(p: argparse.ArgumentParser) -> None:
    p.add_argument("card", type=card_name, metavar="CARD", help="card name, e.g. mic0")


def with_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout",
        type=seconds,
        metavar="S",
        help="give up after S seconds (default: the card's configured bound)",
    )
