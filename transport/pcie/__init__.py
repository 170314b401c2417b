"""Top-level composition: one card's PCIe link, host side and card side.

Owns the handshake and the lifetime of everything one link holds (regions,
MMIO, eventfds, address spaces, message link, the listening socket). A DMA
engine is not started with the link: a data path that copies with DMA opens
one over the side's address space with ``async with link.dma() as dma``.
Built from the other transport modules; imports nothing above ``transport``.
Modules: :mod:`~transport.pcie.common` (the config and what both ends
share), :mod:`~transport.pcie.host` (:class:`PcieHost`),
:mod:`~transport.pcie.card` (:class:`PcieCard`); this package re-exports them.

Two ways to reach the card's end:

- **a socket pair** (``PcieHost(None)``, what the daemon uses): the host
  creates a pre-connected pair and hands :attr:`PcieHost.card_fd` to the one
  process it spawns (``pass_fds``), which runs ``PcieCard(socket)``. Nothing
  else can reach the link: there is no path to connect to, so no stranger can
  delay, fail or claim a boot.
- **a listening path** (``PcieHost(path)``, created 0600): any process of the
  user may connect. Handshakes are served concurrently (at most
  :data:`MAX_HANDSHAKES` at once), each within ``handshake_timeout`` (2 s by
  default): a peer that sends half a hello, or nothing, or connects and
  closes in a loop, holds one slot for at most that long and never delays
  another peer's handshake; the first peer to complete one gets the link.

Handshake (version 1, messages in :mod:`transport.handshake`)::

    card -> host  Hello
    host -> card  Offer + SCM_RIGHTS fds: card_ram, host_ram, mmio memfds, then
                  the card vectors' eventfds, then the host vectors' eventfds
    card -> host  Ready
    either side   Refuse

Anything else (garbage, another protocol or version, missing or extra fds, a
region that is not a sealed memfd of the announced size) is refused with a
``refuse`` frame when possible and :class:`~transport.errors.HandshakeError`
locally. On a path the host keeps listening after refusing a bad peer
(``refused`` keeps the last :data:`MAX_REFUSALS` reasons, ``refusals``
counts them all, and the log says so a few times per second at most); on a
socket pair there is no other peer, so a refusal ends :meth:`PcieHost.accept`.
The card gives up.
"""

from transport.handshake import PROTOCOL, PROTOCOL_VERSION, CardIdentity
from transport.pcie.card import PcieCard
from transport.pcie.common import PcieConfig
from transport.pcie.host import MAX_HANDSHAKES, MAX_REFUSALS, PcieHost, RefusalError

__all__ = [
    "MAX_HANDSHAKES",
    "MAX_REFUSALS",
    "PROTOCOL",
    "PROTOCOL_VERSION",
    "CardIdentity",
    "PcieCard",
    "PcieConfig",
    "PcieHost",
    "RefusalError",
]
