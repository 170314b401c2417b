"""Host reach: accelerator channels that host scripts open on the card (MIC offload).

A host script (``mic_host.client.accel``, through ``CardClient.accel_session``)
connects to the card's offload endpoint (a Unix socket named in the boot
parameters, played like a SCIF endpoint) and asks for a channel. The card
answers with a queue of the ordinary accelerator format (``virtio.accel``:
status page, split ring, request slots, heap) placed in **card RAM**, and hands
it to one of the device's engine workers. From then on nothing but
notifications crosses the socket:

- the host script maps card RAM (the card's RAM aperture: the fd the card
  process got from the host at boot) and writes its requests, the ring and the
  payloads there; the engine worker maps the same card RAM and serves the
  queue in place, through the same PASID check as a card app's queue (only the
  channel's heap is addressable by requests);
- doorbells and interrupts go through a one-doorbell-each-way ``transport.Mmio``
  that the host script creates and passes with the open request;
- the socket carries the open request and its answer (with the card-RAM fd),
  the host's ``close``, and the card's ``fault`` notices (the channel was
  disabled: engine crash or hang, ring error). A closed socket closes the
  channel: the worker detaches and the card RAM is freed.

Endpoint protocol (transport ``FramedSocket`` frames, one channel per connection):

- host->card ``open``: ``protocol``, ``alg``, ``op``, ``level``, ``heap_size``;
  fds: the MMIO region, the h2c eventfd, the c2h eventfd;
- card->host ``opened``: ``device``, ``qid``, ``pasid``, ``heap_size``,
  ``region_off``, ``region_size``, ``card_ram_size``, ``op``, ``alg``,
  ``alg2``, ``worker``; fd: card RAM;
- card->host ``error``: ``error``, the project's one error wire form
  (:class:`virtio.errors.WireError`: ``type`` the card's own class, ``base``
  the nearest ``virtio.errors`` class, ``message``), then the connection closes;
- card->host ``fault``: ``reason`` (the channel is disabled);
- host->card ``close``.

Whatever a host script sends, the card OS answers with an error or closes the
connection; nothing else on the card is affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from mic_card.accel.api import Accelerators
from mic_card.accel.channel import close_fds
from mic_card.accel.errors import NoProvider, QueueStateError
from mic_card.accel.owner import ChannelOwner
from mic_card.accel.qstate import QState, QueueStats
from mic_card.accel.session import SessionSpec
from mic_card.accel.wire import (
    OFFLOAD_DEFAULT_HEAP,
    OFFLOAD_MAX_HEAP,
    OFFLOAD_MIN_HEAP,
    OFFLOAD_PROTOCOL,
    STATUS_MAGIC,
    QueueGeometry,
    StatusWord,
)
from mic_card.services import CardServices
from transport import FramedSocket, LinkLost
from virtio.errors import (
    LocalProtocolError,
    MicError,
    RemoteProtocolError,
    ResourceError,
    WireError,
)

__all__ = ["OFFLOAD_PROTOCOL", "HostChannel", "serve_channel"]

log = logging.getLogger("mic_card.accel")

#: how long a host script may take to send its open request
OPEN_TIMEOUT = 10.0
#: fds of an open request: MMIO region, h2c eventfd, c2h eventfd
_OPEN_FDS = 3


class HostChannel:
    """The card's side of one host channel: a queue region in card RAM, served by a worker.

    It is one of the device's queues (counted in ``available_instances``,
    shown by ``mgmt.stats()``, failed by an engine crash like any queue), but
    its driver side is the host script: the card OS only places it, attaches
    it to a worker and tells the host when it is disabled. ``reset`` is not
    offered: the host closes and reopens the channel.
    """

    def __init__(
        self,
        device: ChannelOwner,
        qid: int,
        pasid: int,
        heap_size: int,
        card: CardServices,
        mmio_fds: list[int],
    ) -> None:
        self.device = device
        self.qid = qid
        self.state = QState.INIT
        self.geometry = QueueGeometry(pasid, heap_size)
        self.stats = QueueStats()
        self.faults: asyncio.Queue[str] = asyncio.Queue()
        self.disabled: str | None = None
        self._closed = False
        self._card = card
        self._mmio_fds = mmio_fds
        self._ram = card.card_ram
        self.offset = card.alloc(self.geometry.region_size, 4096)
        view = self._ram.view()[self.offset : self.offset + self.geometry.region_size]
        view[:] = bytes(len(view))  # card RAM is reused: no stale ring or status
        self._words = view[:4096].cast("Q")
        view.release()
        self._words[StatusWord.MAGIC] = STATUS_MAGIC

    # -- ServedQueue -------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def status_word(self, w: StatusWord) -> int:
        return 0 if self._closed else int(self._words[w])

    def attach_request(self) -> tuple[dict[str, Any], list[int]]:
        """The worker maps card RAM and serves the queue at ``offset`` in it."""
        extra = {"region_off": self.offset, "region_total": self._ram.size}
        return extra, [self._ram.fd, *self._mmio_fds]

    def fault(self, reason: str) -> None:
        """Disable the channel (engine crash/hang, ring error) and tell the host."""
        if self.state is not QState.STARTED or self.disabled is not None:
            return
        self.disabled = reason
        self.stats.faults += 1
        self._words[StatusWord.DISABLED] = 1
        self.faults.put_nowait(reason)

    async def reset(self) -> None:
        """Raises: QueueStateError: a host channel is recovered by reopening it."""
        raise QueueStateError(f"queue {self.qid} is a host channel: the host reopens it")

    async def start(self) -> None:
        """Hand the channel to an engine worker."""
        await self.device.attach(self)
        self.state = QState.STARTED

    async def aclose(self) -> None:
        """Detach from the worker, free the card RAM (idempotent)."""
        if self._closed:
            return
        self._closed = True
        was_started = self.state is QState.STARTED
        self.state = QState.ZOMBIE
        try:
            self._words[StatusWord.DISABLED] = 1
            if was_started:
                await self.device.detach(self)
        finally:
            self._words.release()
            close_fds(self._mmio_fds)
            self._mmio_fds = []
            self._card.free(self.offset)
            self.device.released(self)

    def opened(self) -> dict[str, Any]:
        """The ``opened`` answer (without the op numbers)."""
        g = self.geometry
        return {
            "type": "opened",
            "device": self.device.name,
            "qid": self.qid,
            "pasid": g.pasid,
            "heap_size": g.heap_size,
            "region_off": self.offset,
            "region_size": g.region_size,
            "card_ram_size": self._ram.size,
            "worker": self.device.worker_of(self),
        }


def _wire_error(e: BaseException) -> dict[str, str]:
    """An ``error`` answer's ``error``: the project's one wire form
    (``{"type", "base", "message"}``, :class:`virtio.errors.WireError`)."""
    return WireError.from_exception(e).to_wire()


def _field(msg: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    v = msg.get(name, default)
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
        raise RemoteProtocolError(f"open: {name!r} must be {kind.__name__}", reason="bad-open")
    return v


async def _open(
    card: CardServices, msg: dict[str, Any], fds: list[int]
) -> tuple[HostChannel, dict[str, int]]:
    """Validate an open request and start its channel (takes the fds).

    Raises:
        RemoteProtocolError: a malformed request.
        LocalProtocolError: a bad session spec (unknown algorithm, op, level).
        NoProvider, QueueBusy, DeviceIsolated, ResourceError, AccelError: no channel.
    """
    try:
        if msg.get("type") != "open" or msg.get("protocol") != OFFLOAD_PROTOCOL:
            raise RemoteProtocolError(
                f"expected an open request of {OFFLOAD_PROTOCOL}", reason="bad-open"
            )
        if len(fds) != _OPEN_FDS:
            raise RemoteProtocolError(
                f"open carries {len(fds)} fds, expected {_OPEN_FDS}", reason="bad-open"
            )
        alg = _field(msg, "alg", str)
        op = msg.get("op")
        if op is not None and not isinstance(op, str):
            raise RemoteProtocolError("open: 'op' must be a string or null", reason="bad-open")
        level = _field(msg, "level", int, 6)
        heap = _field(msg, "heap_size", int, OFFLOAD_DEFAULT_HEAP)
        if not OFFLOAD_MIN_HEAP <= heap <= OFFLOAD_MAX_HEAP or heap % 8192:
            raise LocalProtocolError(
                f"heap_size {heap}: a multiple of 8 KiB in [{OFFLOAD_MIN_HEAP}, {OFFLOAD_MAX_HEAP}]"
            )
        if not -1 <= level <= 9:
            raise LocalProtocolError(f"level {level} outside -1..9")
        spec = SessionSpec(alg, op=op, level=level)
        wire_op, a1, a2 = spec.resolved()
        fw: Accelerators = await card.accelerators()
        devs = fw.find(alg)
        if not devs:
            raise NoProvider(f"no card accelerator offers {alg!r}")
        err: MicError | None = None
        for dev in devs:
            try:
                qid, pasid = dev.admit()
            except ResourceError as e:  # busy or isolated: try the next device
                err = e
                continue
            break
        else:
            assert err is not None
            raise err
        ch = HostChannel(dev, qid, pasid, heap, card, fds)
        fds = []  # the channel owns them now
        dev.adopt(ch)
    except BaseException:
        close_fds(fds)
        raise
    try:
        await ch.start()
    except BaseException:
        await ch.aclose()
        raise
    return ch, {"op": int(wire_op), "alg": int(a1), "alg2": int(a2)}


async def serve_channel(fs: FramedSocket, card: CardServices) -> None:
    """Serve one connection of the offload endpoint: open a channel, keep it until closed.

    Never raises for what the host sends (errors are answered, then the
    connection closes); the channel is closed when the connection ends.
    """
    ch: HostChannel | None = None
    try:
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                msg, fds = await fs.recv_frame()
        except (TimeoutError, LinkLost, MicError, OSError) as e:
            log.warning("offload endpoint: no open request: %s", e)
            return
        try:
            ch, ops = await _open(card, msg, fds)
        except (MicError, ValueError) as e:
            log.warning("offload endpoint: refused %.200r: %s", msg, e)
            with contextlib.suppress(LinkLost, MicError, OSError):
                await fs.send_frame({"type": "error", "error": _wire_error(e)})
            return
        await fs.send_frame({**ch.opened(), **ops}, [card.card_ram.fd])
        log.info("offload channel %s/q%d opened by a host script", ch.device.name, ch.qid)
        async with asyncio.TaskGroup() as tg:
            notifier = tg.create_task(_notify_faults(fs, ch))
            await _until_closed(fs)
            notifier.cancel()
    except (LinkLost, MicError, OSError) as e:
        log.info("offload endpoint: connection ended: %s", e)
    finally:
        if ch is not None:
            await ch.aclose()
            log.info("offload channel %s/q%d closed", ch.device.name, ch.qid)
        fs.close()


async def _until_closed(fs: FramedSocket) -> None:
    """Read until ``close``, EOF or a bad frame; anything else is ignored (and logged)."""
    with contextlib.suppress(LinkLost, MicError, OSError):
        while True:
            msg, fds = await fs.recv_frame()
            close_fds(fds)
            if msg.get("type") == "close":
                return
            log.warning("offload endpoint: ignoring %.200r", msg)


async def _notify_faults(fs: FramedSocket, ch: HostChannel) -> None:
    with contextlib.suppress(LinkLost, MicError, OSError):
        while True:
            reason = await ch.faults.get()
            await fs.send_frame({"type": "fault", "reason": reason})
