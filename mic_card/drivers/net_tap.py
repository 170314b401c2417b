"""The kernel side of a card NIC in tap mode: its TAP, opened in the daemon's namespace.

The namespace has one owner, the host daemon (it creates it before the card
boots or the NIC is hot-added, and deletes it when its net backend closes);
the card only opens its TAP there. :func:`open_card_tap` opens and configures
it (MAC, offloads, carrier, address, MTU, default route) or raises, leaving
nothing open. ``transport.tap`` is imported here only, on the tap path, so a
card without a privileged NIC never loads it.

Used by :mod:`mic_card.drivers.net`; never imports the shell or the card OS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtio.net import Offloads

if TYPE_CHECKING:
    from transport.tap import Tap

__all__ = ["open_card_tap"]


async def open_card_tap(
    ifname: str,
    netns: str,
    *,
    mac: str,
    offloads: Offloads,
    link_up: bool,
    address: str | None,
    mtu: int,
    gateway: str | None,
) -> Tap:
    """TAP ``ifname`` (``IFF_VNET_HDR``) in the existing namespace ``netns``, configured.

    ``offloads`` are what the kernel may hand us (what the host takes from the
    card). Closed again on any failure or cancellation.

    Raises:
        TapError: the namespace does not exist (the daemon creates it), or the
            TAP could not be opened or configured.
        MicError, OSError: ``ip`` failed.
    """
    from transport.tap import Tap, TapError, ip, netns_exists

    if not netns_exists(netns):
        raise TapError(f"namespace {netns} does not exist: the daemon creates it")
    tap = Tap.open(ifname, netns=netns)
    try:
        await ip("link", "set", ifname, "address", mac, netns=netns)
        tap.set_offloads(
            csum=offloads.csum, tso4=offloads.tso4, tso6=offloads.tso6, ecn=offloads.ecn
        )
        tap.set_carrier(link_up)
        await tap.configure(address, mtu=mtu)
        if gateway:
            await ip("route", "replace", "default", "via", gateway, netns=netns)
    except BaseException:
        tap.close()
        raise
    return tap
