"""The network shell commands: ``ifconfig``, ``ip addr``/``ip link`` and ``netstat -i``.

The text (net-tools and iproute2 formats) of the card's virtio-net NICs
(:class:`mic_card.drivers.net.NetDevice`). Registered on import. Imports the
net driver and the registry; the driver never imports the shell.
"""

from __future__ import annotations

import collections
import ipaddress

from mic_card.drivers.net import ERROR_REASONS, NetDevice
from mic_card.shell.registry import ShellContext, command
from virtio.constants import DeviceType
from virtio.errors import MicError

__all__ = [
    "ifconfig_text",
    "ip_addr_text",
    "netstat_text",
    "shell_ifconfig",
    "shell_ip",
    "shell_netstat",
]


def _nics(ctx: ShellContext) -> list[NetDevice]:
    card = ctx.card
    if card is None:
        return []
    out: list[NetDevice] = []
    for d in card.devices():
        if d.get("type") == DeviceType.NET and d.get("driver"):
            try:
                drv = card.device(d["name"])
            except MicError:
                continue
            if isinstance(drv, NetDevice):
                out.append(drv)
    return out


def _pick(ctx: ShellContext, name: str | None) -> list[NetDevice]:
    nics = _nics(ctx)
    if name is None:
        return nics
    return [n for n in nics if name in (n.name, n.ifname)]


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def _addr(nic: NetDevice) -> tuple[str, int, str, str] | None:
    """(address, prefix length, netmask, broadcast) of the card address, if any."""
    if not nic.card_ip:
        return None
    try:
        iface = ipaddress.ip_interface(nic.card_ip)
    except ValueError:
        return None
    net = iface.network
    return str(iface.ip), net.prefixlen, str(net.netmask), str(net.broadcast_address)


def _errors_dropped(c: collections.Counter[str]) -> tuple[int, int]:
    errors = sum(v for k, v in c.items() if k in ERROR_REASONS)
    return errors, sum(c.values()) - errors


def ifconfig_text(nic: NetDevice) -> str:
    """One net-tools ``ifconfig`` block for ``nic``."""
    running = nic.link_up and nic.running
    flags = 0x1003 | (0x40 if running else 0)  # UP BROADCAST [RUNNING] MULTICAST
    names = "UP,BROADCAST,RUNNING,MULTICAST" if running else "UP,BROADCAST,MULTICAST"
    lines = [f"{nic.name}: flags={flags}<{names}>  mtu {nic.mtu}"]
    a = _addr(nic)
    if a is not None:
        lines.append(f"        inet {a[0]}  netmask {a[2]}  broadcast {a[3]}")
    lines.append(f"        ether {nic.mac_str}  txqueuelen 1000  (Ethernet)")
    rx_err, rx_drop = _errors_dropped(nic.rx_dropped)
    tx_err, tx_drop = _errors_dropped(nic.tx_dropped)
    lines += [
        f"        RX packets {nic.rx_packets}  bytes {nic.rx_bytes} ({_human(nic.rx_bytes)})",
        f"        RX errors {rx_err}  dropped {rx_drop}  overruns 0  frame 0",
        f"        TX packets {nic.tx_packets}  bytes {nic.tx_bytes} ({_human(nic.tx_bytes)})",
        f"        TX errors {tx_err}  dropped {tx_drop} overruns 0  carrier 0  collisions 0",
    ]
    where = f"TAP {nic.ifname} in netns {nic.netns}" if nic.mode == "tap" else nic.mode
    lines.append(f"        virtio-net  mode {where}")
    return "\n".join(lines) + "\n"


def ip_addr_text(index: int, nic: NetDevice) -> str:
    """One iproute2 ``ip addr`` entry for ``nic``."""
    up = nic.link_up and nic.running
    flags = "BROADCAST,MULTICAST,UP,LOWER_UP" if up else "NO-CARRIER,BROADCAST,MULTICAST,UP"
    lines = [
        f"{index}: {nic.name}: <{flags}> mtu {nic.mtu} qdisc pfifo_fast state "
        f"{'UP' if up else 'DOWN'} group default qlen 1000",
        f"    link/ether {nic.mac_str} brd ff:ff:ff:ff:ff:ff",
    ]
    if nic.mode == "tap":
        lines[-1] += f" link-netns {nic.netns}"
    a = _addr(nic)
    if a is not None:
        lines.append(f"    inet {a[0]}/{a[1]} brd {a[3]} scope global {nic.name}")
        lines.append("       valid_lft forever preferred_lft forever")
    return "\n".join(lines) + "\n"


def netstat_text(nics: list[NetDevice]) -> str:
    """net-tools ``netstat -i``: the kernel interface table."""
    rows = ["Kernel Interface table"]
    rows.append(
        f"{'Iface':<10}{'MTU':>6}{'RX-OK':>9}{'RX-ERR':>7}{'RX-DRP':>7}{'RX-OVR':>7}"
        f"{'TX-OK':>9}{'TX-ERR':>7}{'TX-DRP':>7}{'TX-OVR':>7} Flg"
    )
    for nic in nics:
        rx_err, rx_drop = _errors_dropped(nic.rx_dropped)
        tx_err, tx_drop = _errors_dropped(nic.tx_dropped)
        flg = "BMRU" if nic.link_up and nic.running else "BMU"
        rows.append(
            f"{nic.name:<10}{nic.mtu:>6}{nic.rx_packets:>9}{rx_err:>7}{rx_drop:>7}{0:>7}"
            f"{nic.tx_packets:>9}{tx_err:>7}{tx_drop:>7}{0:>7} {flg}"
        )
    return "\n".join(rows) + "\n"


@command("ifconfig", help="the card's network interfaces", usage="ifconfig [-a] [IFACE]")
async def shell_ifconfig(ctx: ShellContext, args: list[str]) -> int:
    """``ifconfig [-a] [IFACE]``."""
    args = [a for a in args if a != "-a"]
    if len(args) > 1:
        await ctx.err("usage: ifconfig [-a] [IFACE]\n")
        return 2
    nics = _pick(ctx, args[0] if args else None)
    if args and not nics:
        await ctx.err(f"{args[0]}: error fetching interface information: Device not found\n")
        return 1
    await ctx.out("\n".join(ifconfig_text(n) for n in nics))
    return 0


@command("ip", help="network interfaces, iproute2 style", usage="ip addr [show [IFACE]] | ip link")
async def shell_ip(ctx: ShellContext, args: list[str]) -> int:
    """``ip addr|a [show [IFACE]]`` (and ``ip link`` without addresses)."""
    if not args or args[0] not in ("addr", "a", "address", "link", "l"):
        await ctx.err("usage: ip addr [show [IFACE]] | ip link\n")
        return 2
    rest = args[1:]
    if rest and rest[0] in ("show", "list", "ls"):
        rest = rest[1:]
    if rest and rest[0] == "dev":
        rest = rest[1:]
    if len(rest) > 1:
        await ctx.err("usage: ip addr [show [dev] IFACE]\n")
        return 2
    name = rest[-1] if rest else None
    nics = _pick(ctx, name)
    if name is not None and not nics:
        await ctx.err(f'Device "{name}" does not exist.\n')
        return 1
    all_nics = _nics(ctx)
    text = ""
    for nic in nics:
        entry = ip_addr_text(all_nics.index(nic) + 1, nic)
        if args[0] in ("link", "l"):
            entry = "".join(entry.splitlines(keepends=True)[:2])
        text += entry
    await ctx.out(text)
    return 0


@command("netstat", help="the kernel interface table", usage="netstat -i")
async def shell_netstat(ctx: ShellContext, args: list[str]) -> int:
    """``netstat -i``."""
    if args != ["-i"]:
        await ctx.err("usage: netstat -i\n")
        return 2
    await ctx.out(netstat_text(_nics(ctx)))
    return 0
