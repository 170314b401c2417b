"""The transmit half of the card's virtio-net driver (virtio 1.2 §5.1.6.2).

Owns the transmit slots (card RAM the frames go out of) on transmitq
(queue 1): :meth:`NetTx.send_nowait`/:meth:`NetTx.send` for frames-mode
apps, and in tap mode the TAP reader, which reads each frame the card's
kernel sent straight into a free slot (``os.readv``, header included) and
puts it on the ring; it pauses while no slot or ring room is free and
resumes on the next transmit completion.

Part of :class:`mic_card.drivers.net.NetDevice` (see
:mod:`mic_card.drivers.net_base`); imports ``virtio`` and ``net_base`` only.
"""

from __future__ import annotations

import asyncio
import logging
import os

from mic_card.drivers.net_base import TAP_BATCH, TX_REAP_IDLE, NetState
from virtio import trace
from virtio.errors import BrokenResourceError, LocalProtocolError, WouldBlock
from virtio.net import ETH_HLEN, NET_HDR, NET_HDR_SIZE, FrameError, check_header

__all__ = ["NetTx"]

log = logging.getLogger("mic_card.drivers.net")


class NetTx(NetState):
    """Transmit: slots, ``send``, and the TAP reader (tap mode).

    Transmit completions do not interrupt the card (Linux virtio-net without
    ``napi_tx``): the host would otherwise interrupt once for a ping's
    request and again for its reply. They are reaped on the next transmit,
    by any interrupt of the device (the reply's), and, so that an idle NIC
    still gets its slots back, by a timer :data:`TX_REAP_IDLE` after a
    transmit (again while some are in flight and the host makes progress).
    The driver asks for interrupts again only when no slot or ring room is
    left, or when the host consumed nothing for a whole timer period, until
    half the slots are free.
    """

    _tx_timer: asyncio.TimerHandle | None = None
    _tx_reaped = -1  # txq.completed when the idle timer last looked

    def _tx_start(self) -> None:
        """Transmit completions are reaped, not interrupted for (call once, at setup)."""
        self.txq.suppress_interrupts()

    def _tx_stop(self) -> None:
        if self._tx_timer is not None:
            self._tx_timer.cancel()
            self._tx_timer = None

    def _on_tx_done(self, slot: int, _length: int) -> None:
        """The host consumed slot ``slot`` (called by the reap itself). Never raises."""
        if self._closed is not None:
            return
        free = self._tx_free
        free.append(slot)
        self._tx_room.set()
        if not self._reading and self._tap_fd >= 0:
            self._resume_tap()
        if len(free) * 2 >= self._tx.count and not self.txq.interrupts_suppressed:
            self.txq.suppress_interrupts()  # room again: back to reaping

    def _tx_low(self) -> None:
        """No slot or ring room: reap, and ask for an interrupt for the rest."""
        self.txq.reclaim()
        self.txq.allow_interrupts()

    def _tx_reap_idle(self) -> None:
        self._tx_timer = None
        if self._closed is not None:
            return
        txq = self.txq
        txq.reclaim()
        if not txq.outstanding:
            return
        if txq.completed != self._tx_reaped:
            # Still in flight but the host is making progress: look again later.
            self._tx_reaped = txq.completed
            self._tx_timer = asyncio.get_running_loop().call_later(TX_REAP_IDLE, self._tx_reap_idle)
        else:
            # Nothing consumed for a whole period: let the host interrupt when
            # it gets to them, rather than polling a stalled queue.
            txq.allow_interrupts()

    def _submit_tx(self, slot: int, length: int) -> None:
        """Raises: WouldBlock, BrokenResourceError (the slot is still the caller's)."""
        self.txq.submit_callback(((self._tx.addrs[slot], length),), (), self._tx_cbs[slot])
        if self._tx_timer is None:
            self._tx_timer = asyncio.get_running_loop().call_later(TX_REAP_IDLE, self._tx_reap_idle)

    def _count_tx(self, frame_len: int, gso_type: int) -> None:
        self.tx_packets += 1
        self.tx_bytes += frame_len
        if gso_type:
            self.tx_gso += 1
        if frame_len > self.tx_largest:
            self.tx_largest = frame_len

    def send_nowait(
        self,
        frame: bytes | bytearray | memoryview,
        *,
        flags: int = 0,
        gso_type: int = 0,
        hdr_len: int = 0,
        gso_size: int = 0,
        csum_start: int = 0,
        csum_offset: int = 0,
    ) -> None:
        """Queue one Ethernet frame for the host (the header fields default to zero:
        a complete frame; set them for a partial checksum or a GSO segment when
        CSUM / HOST_TSO were negotiated).

        Raises:
            WouldBlock: no free transmit slot or ring room right now.
            LocalProtocolError: a runt, oversized frame or a header the host did
                not negotiate.
            BrokenResourceError: the device went away.
        """
        if self._closed is not None:
            raise BrokenResourceError(str(self._closed))
        n = len(frame)
        hdr = (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)
        try:
            check_header(hdr, n, self._tx_accepts, mtu=self.mtu, from_driver=True)
        except FrameError as e:
            raise LocalProtocolError(f"{self.name}: {e}") from e
        if n + NET_HDR_SIZE > self._tx.size:
            raise LocalProtocolError(f"{self.name}: frame of {n} B does not fit a transmit slot")
        if len(self._tx_free) * 2 < self._tx.count:
            self.txq.reclaim()
        if not self._tx_free or not self.txq.queue.num_free:
            self._tx_low()
            raise WouldBlock(f"{self.name}: transmit ring full")
        slot = self._tx_free.pop()
        view = self._tx.views[slot]
        NET_HDR.pack_into(view, 0, *hdr)
        view[NET_HDR_SIZE : NET_HDR_SIZE + n] = frame
        try:
            self._submit_tx(slot, NET_HDR_SIZE + n)
        except (WouldBlock, BrokenResourceError):
            self._tx_free.append(slot)
            raise
        self._count_tx(n, gso_type)

    async def send(self, frame: bytes | bytearray | memoryview, **header: int) -> None:
        """Queue one Ethernet frame, waiting for a free transmit slot.

        Returns once the frame is on the ring (not when the host consumed it).

        Raises: as :meth:`send_nowait` (except WouldBlock).
        """
        while True:
            try:
                self.send_nowait(frame, **header)
                return
            except WouldBlock:
                self._tx_room.clear()
                await self._tx_room.wait()

    # -- the TAP reader (tap mode) ------------------------------------------------
    def _resume_tap(self) -> None:
        if self._tap_fd >= 0 and not self._reading:
            asyncio.get_running_loop().add_reader(self._tap_fd, self._on_tap_readable)
            self._reading = True

    def _pause_tap(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self._tap_fd)
            self._reading = False

    def _on_tap_readable(self) -> None:
        """Frames the card's kernel sent: read each straight into a transmit slot."""
        fd = self._tap_fd
        free = self._tx_free
        q = self.txq.queue
        iov = self._tx_iov
        views = self._tx.views
        readv = os.readv
        if len(free) * 2 < len(views):
            self.txq.reclaim()
        for i in range(TAP_BATCH):
            if not free or not q.num_free:
                self._pause_tap()  # resumed by the next transmit completion
                self._tx_low()
                return
            slot = free.pop()
            try:
                n = readv(fd, iov[slot])
            except BlockingIOError:
                free.append(slot)
                # Drained: nothing more to coalesce with, so publish and kick
                # now rather than at the end of the loop iteration.
                self.txq.flush()
                return
            except OSError as e:
                free.append(slot)
                log.error("%s: TAP read failed: %s", self.name, e)
                self._pause_tap()
                return
            if trace.ON:
                trace.mark(trace.CARD_TAP_IN)
            if n < NET_HDR_SIZE + ETH_HLEN:
                free.append(slot)
                self.tx_dropped["runt"] += 1
                continue
            try:
                self._submit_tx(slot, n)
            except (WouldBlock, BrokenResourceError):
                free.append(slot)
                self.tx_dropped["ring"] += 1
                self._pause_tap()
                return
            self._count_tx(n - NET_HDR_SIZE, views[slot][1])
            if not i:
                # Kick for the first frame before looking for more: the host
                # starts on it while we read on (a ping has no second frame);
                # the rest are published together when the TAP is drained.
                self.txq.flush()
