"""``micctl``: the command-line control of a running mic-host daemon (after Linux ``micctrl``).

Owns argument parsing, the output formats (tables for people, ``--json`` for
scripts), exit codes and the subcommand registry :data:`SUBCOMMANDS` that
later features extend (``console``, ``exec``, ``net``) with
:func:`register_subcommand`. Talks to the daemon only through
:mod:`mic_host.client`. The reference is ``docs/cli.md``.

Exit codes: 0 success, 1 the operation failed (or no daemon), 2 usage error,
130 interrupted. Every failure prints exactly one line ``micctl: <reason>``
on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from mic_host.client import Client, connect
from mic_host.config import (
    CARD_NAME_RE,
    STATE_DIR_ENV,
    parse_size,
    resolve_state_dir,
    validate_device_options,
)
from mic_host.lifecycle import CardState
from mic_host.protocol import OPS
from mic_host.terminal import micctl_subcommands
from virtio.errors import ConfigError, MicError

__all__ = [
    "SUBCOMMANDS",
    "Progress",
    "Subcommand",
    "build_parser",
    "format_net",
    "format_stats",
    "format_status",
    "format_table",
    "attach_options",
    "main",
    "register_subcommand",
]

PROG = "micctl"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A bad command line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
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


# ------------------------------------------------------------------- output


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces; ``None`` shows as ``-``."""
    cells = [list(headers), *([_cell(v) for v in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _device_label(d: object) -> str:
    if not isinstance(d, Mapping):
        return _cell(d)
    label = str(d.get("device") or d.get("name") or "?")
    if d.get("type"):
        label += f":{d['type']}"
    if d.get("name") and d.get("device") and d["name"] != d["device"]:
        label += f"({d['name']})"
    return label


def format_status(result: Mapping[str, Any]) -> str:
    """The ``status`` table: CARD STATE SHUTDOWN PID DEVICES, one row per card."""
    rows = []
    for c in result.get("cards") or []:
        if not isinstance(c, Mapping):
            continue
        devices = c.get("devices") or []
        rows.append(
            [
                c.get("name"),
                c.get("state"),
                c.get("shutdown_status"),
                c.get("pid"),
                ", ".join(_device_label(d) for d in devices) or None,
            ]
        )
    table = format_table(["CARD", "STATE", "SHUTDOWN", "PID", "DEVICES"], rows)
    if result.get("suspended"):
        table += "\n(daemon suspended: cards stay down until 'micctl resume')"
    return table


_STAT_KEYS = ("kicks", "interrupts", "buffers", "bytes", "errors")


def format_stats(result: Mapping[str, Any]) -> str:
    """The ``stats`` table: one row per device queue with its counters."""
    rows: list[list[object]] = []
    for d in result.get("devices") or []:
        if not isinstance(d, Mapping):
            continue
        queues = d.get("queues") or []
        if not queues:
            rows.append([_device_label(d), None, *([None] * len(_STAT_KEYS))])
        for i, q in enumerate(queues):
            if not isinstance(q, Mapping):
                continue
            name = q.get("name", q.get("index", i))
            rows.append([_device_label(d), name, *(q.get(k) for k in _STAT_KEYS)])
    return format_table(["DEVICE", "QUEUE", *(k.upper() for k in _STAT_KEYS)], rows)


def format_net(result: Mapping[str, Any]) -> str:
    """``micctl net``: one block per net device, host side then card side."""
    blocks: list[str] = []
    for d in result.get("devices") or []:
        if not isinstance(d, Mapping):
            continue
        raw_card = d.get("card")
        card: Mapping[str, Any] = raw_card if isinstance(raw_card, Mapping) else {}
        label = d.get("name", "?") + (f" ({d['device']})" if d.get("device") else "")
        lines = [f"{label}: backend {d.get('backend', '?')}, link {d.get('link', '?')}"]
        if "host_interface" in d or "host_ip" in d:
            ns = d.get("netns") or "the daemon's"
            lines.append(
                f"  host: {d.get('host_interface') or '-'}  {d.get('host_ip') or '-'}"
                f"  (namespace {ns})"
            )
        lines.append(
            f"  card: {card.get('ifname') or d.get('device') or '-'}"
            f"  {card.get('card_ip') or d.get('card_ip') or '-'}"
            f"  mode {card.get('mode') or d.get('card_mode') or '-'}"
            f"  namespace {card.get('netns') or d.get('card_netns') or '-'}"
            f"  mac {d.get('mac') or card.get('mac') or '-'}"
        )
        if d.get("offloads") is not None:
            offl = d["offloads"]
            text = " ".join(offl) if isinstance(offl, list) else str(offl)
            lines.append(f"  offloads: {text or 'none'}")
        counters = d.get("counters")
        if isinstance(counters, Mapping) and counters:
            flat = [f"{k} {v}" for k, v in counters.items() if not isinstance(v, Mapping)]
            lines.append("  " + "  ".join(flat))
            # drops by direction and reason: only the reasons that happened
            drops = counters.get("drops")
            if isinstance(drops, Mapping):
                seen = [
                    f"{way}_{reason} {n}"
                    for way, reasons in drops.items()
                    if isinstance(reasons, Mapping)
                    for reason, n in reasons.items()
                    if n
                ]
                if seen:
                    lines.append("  drops: " + "  ".join(seen))
        blocks.append("\n".join(lines))
    return "\n".join(blocks) if blocks else f"{result.get('card', '?')}: no net devices"


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _print_state(card: str, result: Mapping[str, Any]) -> None:
    if "state" in result:
        print(f"{result.get('card', card)}: {result['state']}")


# ---------------------------------------------------------- argument types


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return v


def _size(text: str) -> int:
    try:
        n = parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return n


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return n


def _card(text: str) -> str:
    if not CARD_NAME_RE.match(text):
        raise argparse.ArgumentTypeError(f"bad card name {text!r}: expected micN, e.g. mic0")
    return text


def _app(text: str) -> str:
    pattern = OPS["run"].args["app"].pattern
    assert pattern is not None
    if not re.match(pattern, text):
        raise argparse.ArgumentTypeError(f"bad app {text!r}: expected module:function")
    return text


def _opt_value(text: str) -> object:
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text, 0)
    except ValueError:
        return text


def _opt(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), _opt_value(value)


def attach_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``options`` of an ``attach`` request from its command line.

    Raises:
        UsageError: the same option given twice (a flag and ``--opt``).
    """
    opts: dict[str, Any] = {}
    for key, value in args.opt or []:
        if key in opts:
            raise UsageError(f"option {key!r} given twice")
        opts[key] = value
    flags = {
        "image": args.image,
        "size": args.size,
        "create": True if args.create else None,
        "read_only": True if args.read_only else None,
        "serial": args.serial,
        "num_queues": getattr(args, "queues", None),
    }
    for key, value in flags.items():
        if value is None:
            continue
        if key in opts:
            raise UsageError(f"option {key!r} given both as --{key.replace('_', '-')} and --opt")
        opts[key] = value
    return opts


# -------------------------------------------------------------- subcommands


def _with_card(p: argparse.ArgumentParser) -> None:
    p.add_argument("card", type=_card, metavar="CARD", help="card name, e.g. mic0")


def _with_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help="give up after S seconds (default: the card's configured bound)",
    )


async def _ping(client: Client, args: argparse.Namespace) -> int:
    r = await client.ping()
    if args.json:
        _print_json(r)
    else:
        print(f"mic-host pid {r.get('pid', '?')}, protocol {r.get('version', '?')}")
    return EXIT_OK


def _conf_ping(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the raw result")


async def _status(client: Client, args: argparse.Namespace) -> int:
    r = await client.status(args.card)
    if args.json:
        _print_json(r)
    else:
        print(format_status(r))
    return EXIT_OK


def _conf_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("card", nargs="?", type=_card, metavar="CARD", help="only this card")
    p.add_argument("--json", action="store_true", help="print the raw result (for scripts)")


async def _boot(client: Client, args: argparse.Namespace) -> int:
    _print_state(args.card, await client.card(args.card).boot(args.wait, args.timeout))
    return EXIT_OK


def _conf_boot(p: argparse.ArgumentParser) -> None:
    _with_card(p)
    p.add_argument("--wait", action="store_true", help="until the card is online")
    _with_timeout(p)


async def _shutdown(client: Client, args: argparse.Namespace) -> int:
    _print_state(args.card, await client.card(args.card).shutdown(args.wait, args.timeout))
    return EXIT_OK


def _conf_shutdown(p: argparse.ArgumentParser) -> None:
    _with_card(p)
    p.add_argument("--wait", action="store_true", help="until the card is ready")
    _with_timeout(p)


async def _reset(client: Client, args: argparse.Namespace) -> int:
    _print_state(args.card, await client.card(args.card).reset())
    return EXIT_OK


async def _wait(client: Client, args: argparse.Namespace) -> int:
    _print_state(args.card, await client.card(args.card).wait(args.state, args.timeout))
    return EXIT_OK


def _conf_wait(p: argparse.ArgumentParser) -> None:
    _with_card(p)
    p.add_argument(
        "state", choices=[s.value for s in CardState], metavar="STATE", help="ready, online, ..."
    )
    _with_timeout(p)


class Progress:
    """A progress report on stderr: a redrawn bar on a TTY, a few plain lines otherwise
    (at 0, 25, 50, 75 and 100 %), so logs of scripted runs stay readable."""

    WIDTH = 30

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._last_quarter = -1
        self._last_draw = 0.0
        self._t0 = time.monotonic()

    def update(self, done: int) -> None:
        frac = min(done / self.total, 1.0)
        mib = f"{done / 2**20:.1f}/{self.total / 2**20:.1f} MiB"
        if self.tty:
            now = time.monotonic()
            if frac < 1.0 and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            fill = int(frac * self.WIDTH)
            bar = "#" * fill + "-" * (self.WIDTH - fill)
            rate = done / max(now - self._t0, 1e-6) / 2**20
            self.stream.write(
                f"\r{self.label} [{bar}] {frac:4.0%} {mib} {rate:.0f} MiB/s"
                + ("\n" if frac >= 1.0 else "")
            )
            self.stream.flush()
            return
        quarter = int(frac * 4)
        if quarter > self._last_quarter:
            self._last_quarter = quarter
            print(f"{self.label}: {quarter * 25}% ({mib})", file=self.stream, flush=True)


_CHUNK = 4 << 20


def _copy_image(src: Path, dst: Path, size: int | None) -> None:
    """Copy ``src`` into a new ``dst`` (zero chunks stay holes), grown to ``size``."""
    total = src.stat().st_size
    if size is not None and size < total:
        raise ConfigError(f"--size {size} is smaller than {src} ({total} B)")
    progress = Progress(f"copying {src.name} -> {dst.name}", total)
    progress.update(0)
    buf = bytearray(_CHUNK)
    zero = bytes(_CHUNK)
    with src.open("rb") as fin, dst.open("xb") as fout:
        done = 0
        while True:
            n = fin.readinto(buf)
            if not n:
                break
            if buf[:n] == zero[:n]:
                fout.seek(n, os.SEEK_CUR)  # keep the copy sparse
            else:
                fout.write(memoryview(buf)[:n])
            done += n
            progress.update(done)
        fout.truncate(max(done, size or 0))
        os.fsync(fout.fileno())
    progress.update(total)


def _preallocate_image(dst: Path, size: int) -> None:
    """Create ``dst`` with ``size`` bytes allocated (no holes), in chunks, with progress."""
    progress = Progress(f"allocating {dst.name}", size)
    progress.update(0)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        step = 16 << 20
        for off in range(0, size, step):
            os.posix_fallocate(fd, off, min(step, size - off))
            progress.update(min(off + step, size))
        os.fsync(fd)
    finally:
        os.close(fd)


def _prepare_block_image(
    client: Client, args: argparse.Namespace, opts: dict[str, Any]
) -> Path | None:
    """``--copy-from`` / ``--preallocate``: make the image here, before attaching.

    Returns the path created (removed again if the attach fails), or None.

    Raises:
        ConfigError: bad combination, the image exists, I/O errors.
    """
    if not (args.copy_from or args.preallocate) or "image" not in opts:
        return None
    image = Path(
        validate_device_options(
            "block", {"image": opts["image"]}, state_dir=client.state_dir, card=args.card
        )["image"]
    )
    size = opts.get("size")
    if args.copy_from:
        if image.exists():
            raise ConfigError(f"{image} exists; --copy-from only creates new images")
        make: Callable[[], None] = functools.partial(
            _copy_image, Path(args.copy_from).expanduser(), image, size
        )
    else:
        if not args.create or size is None:
            raise ConfigError("--preallocate needs --create and --size")
        if image.exists():
            return None  # --create: an existing image is used as it is
        make = functools.partial(_preallocate_image, image, int(size))
    try:
        make()
    except (OSError, ConfigError) as e:
        with contextlib.suppress(OSError):
            image.unlink()  # half-made: do not leave it for the next attempt to pick up
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot create {image}: {e.strerror or e}") from e
    opts["image"] = str(image)
    opts.pop("create", None)
    opts.pop("size", None)
    return image


async def _attach(client: Client, args: argparse.Namespace) -> int:
    opts = attach_options(args)
    created = None
    if args.type == "block":
        created = await asyncio.to_thread(_prepare_block_image, client, args, opts)
    try:
        r = await client.card(args.card).attach(args.type, **opts)
    except BaseException:
        if created is not None:
            with contextlib.suppress(OSError):
                created.unlink()
        raise
    print(r.get("device", json.dumps(r, sort_keys=True)))
    return EXIT_OK


def _conf_attach(p: argparse.ArgumentParser) -> None:
    _with_card(p)
    p.add_argument("type", metavar="TYPE", help="block, console, net or a plug-in backend")
    p.add_argument("--image", metavar="PATH", help="block: backing file")
    p.add_argument("--size", type=_size, metavar="SIZE", help="block: size to create, e.g. 64M")
    p.add_argument("--create", action="store_true", help="block: create the image if missing")
    p.add_argument("--read-only", action="store_true", help="block: read-only device")
    p.add_argument("--serial", metavar="S", help="block: serial (GET_ID), <= 20 bytes")
    p.add_argument(
        "--copy-from",
        metavar="SRC",
        help="block: create the image as a copy of SRC (with a progress bar); --size may grow it",
    )
    p.add_argument(
        "--preallocate",
        action="store_true",
        help="block: with --create, allocate every block now (with a progress bar)",
    )
    p.add_argument("--queues", type=_positive, metavar="N", help="block: request queues (MQ)")
    p.add_argument(
        "--opt",
        type=_opt,
        action="append",
        metavar="KEY=VALUE",
        help="any backend option (true/false/ints are converted); repeatable",
    )


async def _detach(client: Client, args: argparse.Namespace) -> int:
    await client.card(args.card).detach(args.device)
    return EXIT_OK


def _conf_detach(p: argparse.ArgumentParser) -> None:
    _with_card(p)
    p.add_argument("device", metavar="DEVICE", help="card device name (vdb) or label")


async def _stats(client: Client, args: argparse.Namespace) -> int:
    r = await client.card(args.card).stats()
    if args.json:
        _print_json(r)
    else:
        print(format_stats(r))
    return EXIT_OK


def _conf_stats(p: argparse.ArgumentParser) -> None:
    _with_card(p)
    p.add_argument("--json", action="store_true", help="print the raw result (for scripts)")


async def _net(client: Client, args: argparse.Namespace) -> int:
    link = None if args.link is None else args.link == "up"
    r = await client.card(args.card).net(args.device, link=link)
    if args.json:
        _print_json(r)
    else:
        print(format_net(r))
    return EXIT_OK


def _conf_net(p: argparse.ArgumentParser) -> None:
    _with_card(p)
    p.add_argument("device", nargs="?", metavar="DEVICE", help="one net device (default: all)")
    p.add_argument("--link", choices=("up", "down"), help="set the link status first")
    p.add_argument("--json", action="store_true", help="print the raw result (for scripts)")


async def _run(client: Client, args: argparse.Namespace) -> int:
    r = await client.card(args.card).run(args.app, *args.args)
    value = r.get("value", r)
    if isinstance(value, str):
        print(value)
    elif value is not None:
        _print_json(value)
    return EXIT_OK


def _conf_run(p: argparse.ArgumentParser) -> None:
    _with_card(p)
    p.add_argument("app", type=_app, metavar="module:function", help="card app to run")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="its arguments")


async def _suspend(client: Client, args: argparse.Namespace) -> int:
    await client.suspend()
    return EXIT_OK


async def _resume(client: Client, args: argparse.Namespace) -> int:
    await client.resume()
    return EXIT_OK


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


for _sub in (
    Subcommand("status", "show cards (table, or --json)", _conf_status, _status),
    Subcommand("boot", "boot a card", _conf_boot, _boot),
    Subcommand("shutdown", "shut a card down", _conf_shutdown, _shutdown),
    Subcommand("reset", "reset a card", _with_card, _reset),
    Subcommand("wait", "wait until a card is in a state", _conf_wait, _wait),
    Subcommand(
        "attach",
        "hot-add a device; prints its card name",
        _conf_attach,
        _attach,
        validate=attach_options,
    ),
    Subcommand("detach", "hot-remove a device", _conf_detach, _detach),
    Subcommand("stats", "per-queue counters", _conf_stats, _stats),
    Subcommand("net", "net devices: backend, addresses, namespace, counters", _conf_net, _net),
    Subcommand("run", "run a card app", _conf_run, _run),
    Subcommand("suspend", "host suspend: stop every card", _no_args, _suspend),
    Subcommand("resume", "host resume: boot cards suspend stopped", _no_args, _resume),
    Subcommand("ping", "check that the daemon answers", _conf_ping, _ping),
):
    register_subcommand(_sub)
del _sub

# console and exec live with the rest of the console client (mic_host/terminal.py)
for _name, _help, _configure, _run_sub in micctl_subcommands():
    register_subcommand(Subcommand(_name, _help, _configure, _run_sub))
del _name, _help, _configure, _run_sub


# --------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every registered subcommand."""
    parser = _Parser(
        prog=PROG,
        description="Control a running mic-host daemon (see docs/cli.md).",
        epilog=f"The state directory is --state-dir, else ${STATE_DIR_ENV}, "
        "else ~/.local/state/mic-vop.",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"the daemon's state directory (default: ${STATE_DIR_ENV} or ~/.local/state/mic-vop)",
    )
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for sub in SUBCOMMANDS.values():
        sp = subs.add_parser(sub.name, help=sub.help, description=sub.help)
        sub.configure(sp)
        sp.set_defaults(_run=sub.run, _validate=sub.validate)
    return parser


async def _main(args: argparse.Namespace) -> int:
    run: Run = args._run
    async with connect(resolve_state_dir(args.state_dir)) as client:
        return await run(client, args)


def _one_line(e: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


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
        return asyncio.run(_main(args))
    except UsageError as e:
        print(f"{PROG}: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except MicError as e:
        print(f"{PROG}: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
