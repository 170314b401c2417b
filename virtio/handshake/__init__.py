"""The device-page handshakes of MIC VOP, as a sans-IO protocol with a host and a card half.

Everything that moves a handshake lives in this file (the h11 rule): which
ctrl fields each side writes and in which order, which doorbell follows,
what counts as an acknowledgement, and the ``(state, input) -> next state``
tables (h2 style) that say which inputs are legal where. The handshakes
(Linux ``drivers/misc/mic/vop/vop_main.c`` and ``vop_vringh.c``, v4-v5.9;
see ``shared/reference/notes_mic_vop_abi.md`` §1):

- *status write*: the card clears ``host_ack``, writes ``status``, rings c2h;
  the host applies it (:class:`~virtio.status.DeviceStatusMachine`),
  publishes the possibly refused status, sets ``host_ack = 1`` and rings the
  device's h2c doorbell. (Our extension: Linux's host never answered.)
- *used-ring move*: the card writes ``used_address`` per vq, sets
  ``used_address_updated = 1``, rings; the host validates the addresses,
  clears the flag and rings back (Linux: the card polled).
- *vdev reset*: the card clears ``host_ack``, sets ``vdev_reset = 1``, rings;
  the host stops and drains the queues, zeroes its rings, sets ``status = 0``,
  forgets moved used rings, clears the flags, sets ``host_ack = 1``, rings.
- *config change* / *hot remove*: the host clears ``guest_ack``, sets
  ``config_change`` (2 / 1) and rings the card's config doorbell; the card
  tells its driver (or unbinds it), sets ``guest_ack = 1`` (for a removal
  first ``h2c_vdev_db = -1``, then ``type = -1``) and rings c2h (our
  extension: Linux's host polled). The host clears both fields afterwards,
  and also when it gives up.

Shape (aioquic/h11 style): each half is fed typed events (:meth:`receive`)
and returns a list of actions for its adapter to perform *in order*. The
core reads the entry through an :class:`~virtio.devpage.EntryView`; every
store it wants is an action (:class:`Publish` and friends, applied with
:func:`publish`) so it lands in order with the adapter's own work (starting
queues, unbinding a driver) — e.g. ``host_ack = 1`` only after the refused
status is visible. Doorbells are actions too: the core never rings, sleeps
or reads a clock. Waiting belongs to the adapters: they bound every wait with
``asyncio.timeout`` (raising :class:`~virtio.errors.MicTimeoutError`), feed
:class:`Tick` on their fallback re-check period (Linux polls) and
:class:`TimedOut` when they stop waiting, so the core cleans the fields up.

Faults: the host half never raises for what the card wrote; a bad value
becomes a :class:`NeedsReset` action (the device, not the host, pays). The
card half raises :class:`~virtio.errors.RemoteProtocolError` for a value the
host may not write, and nothing else. An input that the table does not
allow in the current state is the adapter's bug:
:class:`~virtio.errors.LocalProtocolError`.

Modules: :mod:`~virtio.handshake.events` (inputs, actions, the table step),
:mod:`~virtio.handshake.host` (host half), :mod:`~virtio.handshake.card`
(card half). Imports only ``virtio`` modules below it; no asyncio, no OS, no
``transport``.
"""

from virtio.devpage import Ctrl
from virtio.handshake import card, events, host
from virtio.handshake.card import *  # noqa: F403
from virtio.handshake.events import *  # noqa: F403
from virtio.handshake.host import *  # noqa: F403

# Each module's __all__ is its public list; the package's is their union.
__all__ = ["Ctrl", *events.__all__, *host.__all__, *card.__all__]
