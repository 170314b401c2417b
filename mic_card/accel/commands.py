"""The ``accel`` card-shell command: ``accel list`` and ``accel bench`` (UADK's columns).

The card OS registers ``accel`` as a lazy command
(:func:`mic_card.shell.registry.lazy_command`, with the same help and usage
as here: a test keeps them equal): this module, and the framework behind it,
load on the command's first use. Imports only the shell's registry and the
accelerator tools.
"""

from __future__ import annotations

import json

from mic_card.accel.tools import accel_bench, accel_list_text, bench_args, format_bench
from mic_card.shell.registry import ShellContext, command
from virtio.errors import LocalProtocolError

__all__ = ["ACCEL_HELP", "ACCEL_USAGE"]

ACCEL_HELP = "the card's accelerators: list them, or benchmark one"
ACCEL_USAGE = (
    "accel list | accel bench --alg ALG --size N --seconds S "
    "[--batch B] [--mode sva|nosva] [--op OP] [--level L] [--json]"
)


@command("accel", help=ACCEL_HELP, usage=ACCEL_USAGE, replace=True)
async def _accel(ctx: ShellContext, args: list[str]) -> int:
    if ctx.card is None or not args or args[0] not in ("list", "bench"):
        await ctx.err(f"usage: {ACCEL_USAGE}\n")
        return 2
    fw = await ctx.card.accelerators()
    if args[0] == "list":
        await ctx.out(accel_list_text(fw).rstrip("\n") + "\n")
        return 0
    try:
        opts = bench_args(args[1:])
    except LocalProtocolError as e:
        await ctx.err(f"{e}\n")  # already "accel bench: <problem>"
        return 2
    as_json = bool(opts.pop("json", False))
    result = await accel_bench(fw, **opts)
    await ctx.out(
        json.dumps(result) + "\n" if as_json else format_bench(result).rstrip("\n") + "\n"
    )
    return 0
