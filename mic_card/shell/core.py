"""The core shell commands: help, uname, uptime, devices, dmesg, echo, true,
false, sleep, stty, reboot, poweroff, exit.

Registered on import (:func:`mic_card.shell.registry.command`). Imports the
registry and :mod:`mic_card.shell.base`; never the card OS.
"""

from __future__ import annotations

import asyncio
import time

from mic_card.shell.base import MACHINE, SYSNAME, VERSION, ShellError
from mic_card.shell.registry import COMMANDS, ShellContext, command
from virtio.constants import DeviceType

__all__: list[str] = []


@command("help", help="list the commands, or show one's usage", usage="help [COMMAND]")
async def _help(ctx: ShellContext, args: list[str]) -> int:
    if args:
        cmd = COMMANDS.get(args[0])
        if cmd is None:
            raise ShellError(f"no help topics match '{args[0]}'")
        await ctx.out(f"usage: {cmd.usage}\n  {cmd.help}\n")
        return 0
    width = max(len(c) for c in COMMANDS)
    lines = [
        f"  {c.name.ljust(width)}  {c.help}"
        for c in sorted(COMMANDS.values(), key=lambda c: c.name)
    ]
    await ctx.out("Commands:\n" + "\n".join(lines) + "\n")
    return 0


@command("uname", help="print system information", usage="uname [-asnrvm]")
async def _uname(ctx: ShellContext, args: list[str]) -> int:
    node = ctx.card.name if ctx.card is not None else "card"
    fields = {"s": SYSNAME, "n": node, "r": VERSION, "v": "#1 SMP", "m": MACHINE}
    wanted: list[str] = []
    for a in args:
        if not a.startswith("-") or len(a) < 2:
            raise ShellError(f"extra operand '{a}'")
        for ch in a[1:]:
            if ch == "a":
                wanted.extend("snrvm")
            elif ch in fields:
                wanted.append(ch)
            else:
                raise ShellError(f"invalid option -- '{ch}'")
    order = [k for k in "snrvm" if k in wanted] or ["s"]
    await ctx.out(" ".join(fields[k] for k in order) + "\n")
    return 0


def _fmt_uptime(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    h, m = divmod(minutes, 60)
    d, h = divmod(h, 24)
    return (f"{d} day{'s' if d != 1 else ''}, " if d else "") + f"{h}:{m:02d}"


@command("uptime", help="how long the card OS has been up", usage="uptime [-s]")
async def _uptime(ctx: ShellContext, args: list[str]) -> int:
    up = ctx.card.uptime if ctx.card is not None else 0.0
    if args == ["-s"]:
        await ctx.out(f"{up:.2f}\n")
        return 0
    if args:
        raise ShellError(f"extra operand '{args[0]}'")
    now = time.strftime("%H:%M:%S")
    await ctx.out(f" {now} up {_fmt_uptime(up)} ({up:.2f} s),  load average: 0.00, 0.00, 0.00\n")
    return 0


@command("devices", help="the virtio devices: type, features, queue sizes", usage="devices")
async def _devices(ctx: ShellContext, args: list[str]) -> int:
    devs = ctx.card.devices() if ctx.card is not None else []
    rows = [("NAME", "TYPE", "DRIVER", "STATE", "FEATURES", "QUEUES")]
    for d in devs:
        try:
            kind = DeviceType(int(d["type"])).name.lower()
        except ValueError:
            kind = str(d["type"])
        sizes = ",".join(str(n) for n in d.get("queue_sizes", []))
        rows.append((d["name"], kind, str(d.get("driver") or "-"), str(d.get("state")),
                     f"{int(d.get('features') or 0):#x}", sizes))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)  # fmt: skip
    await ctx.out(text + "\n")
    return 0


@command("dmesg", help="the card's kernel log", usage="dmesg")
async def _dmesg(ctx: ShellContext, args: list[str]) -> int:
    lines = ctx.card.dmesg() if ctx.card is not None else []
    await ctx.out("".join(line + "\n" for line in lines))
    return 0


@command("echo", help="print the arguments", usage="echo [-n] [ARG...]")
async def _echo(ctx: ShellContext, args: list[str]) -> int:
    newline = True
    if args and args[0] == "-n":
        newline, args = False, args[1:]
    await ctx.out(" ".join(args) + ("\n" if newline else ""))
    return 0


@command("true", help="do nothing, successfully", usage="true")
async def _true(ctx: ShellContext, args: list[str]) -> int:
    return 0


@command("false", help="do nothing, unsuccessfully", usage="false")
async def _false(ctx: ShellContext, args: list[str]) -> int:
    return 1


@command("sleep", help="wait N seconds", usage="sleep SECONDS")
async def _sleep(ctx: ShellContext, args: list[str]) -> int:
    if len(args) != 1:
        raise ShellError("usage: sleep SECONDS", 2)
    try:
        seconds = float(args[0])
    except ValueError:
        raise ShellError(f"invalid time interval '{args[0]}'") from None
    if not 0 <= seconds < 1e6:
        raise ShellError(f"invalid time interval '{args[0]}'")
    await asyncio.sleep(seconds)
    return 0


@command("stty", help="the console's window size", usage="stty size")
async def _stty(ctx: ShellContext, args: list[str]) -> int:
    if args != ["size"]:
        raise ShellError("only 'stty size' is supported")
    cols, rows = ctx.size
    await ctx.out(f"{rows} {cols}\n")
    return 0


async def _shutdown(ctx: ShellContext, args: list[str], status: str, verb: str) -> int:
    if args:
        raise ShellError(f"extra operand '{args[0]}'")
    if ctx.card is None:
        raise ShellError("no card to shut down")
    ctx.shutdown = status
    await ctx.out(f"The system is going down for {verb} NOW!\n")
    return 0


@command("reboot", help="restart the card OS", usage="reboot")
async def _reboot(ctx: ShellContext, args: list[str]) -> int:
    return await _shutdown(ctx, args, "restart", "reboot")


@command("poweroff", help="power the card off", usage="poweroff")
async def _poweroff(ctx: ShellContext, args: list[str]) -> int:
    return await _shutdown(ctx, args, "poweroff", "power-off")


@command("exit", help="end the shell session (exec: exit with STATUS)", usage="exit [STATUS]")
async def _exit(ctx: ShellContext, args: list[str]) -> int:
    if len(args) > 1:
        raise ShellError("too many arguments")
    try:
        status = int(args[0]) & 0xFF if args else 0
    except ValueError:
        raise ShellError(f"{args[0]}: numeric argument required", 2) from None
    ctx.exit_requested = True
    return status
