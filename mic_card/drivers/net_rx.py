"""The receive half of the card's virtio-net driver (virtio 1.2 §5.1.6.3-4).

Keeps every receive buffer posted on receiveq (queue 0), reassembles what
the host wrote (MRG_RXBUF ``num_buffers``), checks each header against what
was negotiated (malformed packets dropped and counted by reason, never an
exception), and delivers the frame: to the TAP in tap mode (one
``os.write``/``os.writev`` straight out of the ring buffers), else to the
frames-mode queue :meth:`NetRx.recv` reads. Completions are handled in
the interrupt itself (``DriverEndpoint.submit_callback``): no future, no
task and no extra loop iteration per packet.

Part of :class:`mic_card.drivers.net.NetDevice` (see
:mod:`mic_card.drivers.net_base`); imports ``virtio`` and ``net_base`` only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

from mic_card.drivers.net_base import ERROR_REASONS, LOGGED, NEEDS_CSUM, NetState
from virtio import trace
from virtio.errors import BrokenResourceError, LocalProtocolError, WouldBlock
from virtio.net import (
    ETH_HLEN,
    NET_HDR,
    NET_HDR_SIZE,
    NUM_BUFFERS,
    NUM_BUFFERS_OFFSET,
    FrameError,
    check_header,
    segments_checksum,
    splice_segments,
)

__all__ = ["NetRx"]

log = logging.getLogger("mic_card.drivers.net")


class NetRx(NetState):
    """Receive: posting buffers, reassembly, checks, delivery, frames-mode ``recv``."""

    def _post_rx(self, i: int) -> None:
        try:
            self.rxq.submit_callback((), self._rx_segs[i], self._rx_cbs[i])
        except (WouldBlock, BrokenResourceError, LocalProtocolError) as e:
            # One descriptor per buffer and never more buffers than the ring
            # holds, so only a broken queue gets here (detach follows).
            self.rx_dropped["repost"] += 1
            log.debug("%s: receive buffer not posted: %s", self.name, e)
            return

    def _on_rx(self, i: int, n: int) -> None:
        """Receive buffer ``i`` came back with ``n`` bytes (in used-ring order, from
        the interrupt itself). Never raises. A failed queue never calls it:
        detach frees the pool."""
        if self._closed is not None:
            return
        if self._rx_need:
            self._rx_parts.append((i, n))
            self._rx_need -= 1
            if not self._rx_need:
                parts, self._rx_parts = self._rx_parts, []
                self._deliver(parts)
            return
        if n < NET_HDR_SIZE:
            # §5.1.6.3.1: the header is always in the first buffer.
            self._rx_drop("runt", f"buffer of {n} B holds no header", [(i, n)])
            return
        if self._mrg:
            (nb,) = NUM_BUFFERS.unpack_from(self._rx.views[i], NUM_BUFFERS_OFFSET)
            if not 1 <= nb <= self._rx.count:
                self._rx_drop("num_buffers", f"num_buffers {nb}", [(i, n)])
                return
            if nb > 1:
                self._rx_parts = [(i, n)]
                self._rx_need = nb - 1
                return
        self._deliver([(i, n)])

    def _rx_drop(self, reason: str, why: str, parts: list[tuple[int, int]]) -> None:
        self.rx_dropped[reason] += 1
        if reason in ERROR_REASONS and self._logged < LOGGED:
            self._logged += 1
            log.warning("%s: dropped a malformed packet from the host: %s", self.name, why)
        for j, _ in parts:
            self._post_rx(j)

    def _deliver(self, parts: list[tuple[int, int]]) -> None:
        views = self._rx.views
        i0, n0 = parts[0]
        first = views[i0]
        total = n0 if len(parts) == 1 else sum(n for _, n in parts)
        frame_len = total - NET_HDR_SIZE
        flags, gso_type = first[0], first[1]
        # Fast path for the common plain frame; everything else gets the full check
        # (virtio 1.2 §5.1.6.4.1: what the device may set).
        if flags or gso_type or not ETH_HLEN <= frame_len <= self._rx_max:
            hdr = NET_HDR.unpack_from(first)
            try:
                check_header(hdr, frame_len, self._rx_accepts, mtu=self.mtu, from_driver=False)
            except FrameError as e:
                self._rx_drop(e.reason, str(e), parts)
                return
            if gso_type:
                self.rx_gso += 1
        self.rx_packets += 1
        self.rx_bytes += frame_len
        if frame_len > self.rx_largest:
            self.rx_largest = frame_len
        fd = self._tap_fd
        if fd >= 0:
            try:
                if len(parts) == 1:
                    os.write(fd, first[:n0])
                else:
                    os.writev(fd, [views[j][:n] for j, n in parts])
                if trace.ON:
                    trace.mark(trace.CARD_TAP_OUT)
            except OSError as e:
                self.rx_dropped["tap_write"] += 1
                if self._logged < LOGGED:
                    self._logged += 1
                    log.warning("%s: TAP refused a packet: %s", self.name, e)
        elif self.mode == "frames":
            self._queue_frame(parts, frame_len, flags)
        else:
            self.rx_dropped["not_ready"] += 1  # TAP still being set up
        for j, _ in parts:
            self._post_rx(j)

    def _queue_frame(self, parts: list[tuple[int, int]], frame_len: int, flags: int) -> None:
        if len(self._rxq) >= self.rx_queue_max:
            self.rx_dropped["queue_full"] += 1
            return
        views = self._rx.views
        i0, n0 = parts[0]
        segs = [views[i0][NET_HDR_SIZE:n0], *(views[j][:n] for j, n in parts[1:])]
        if flags & NEEDS_CSUM:
            # Only when tap mode fell back to frames after GUEST_CSUM was acked:
            # finish the checksum as a NIC would (Linux skb_checksum_help), summed
            # where the frame lies in the ring; apps get immutable bytes (recv() ->
            # bytes), so the one copy out of the ring splices the 2 bytes in.
            _, _, _, _, start, offset, _ = NET_HDR.unpack_from(views[i0])
            try:
                csum = segments_checksum(segs, start, offset)
            except LocalProtocolError:  # check_header bounds it; never from here
                self.rx_dropped["bad_header"] += 1
                return
            frame = b"".join(splice_segments(segs, start + offset, csum))
        elif len(segs) == 1:
            frame = bytes(segs[0])
        else:
            frame = b"".join(segs)
        self._rxq.append(frame)
        self._rx_ready.set()

    # -- frames mode receive -------------------------------------------------------
    def recv_nowait(self) -> bytes:
        """The next received Ethernet frame.

        Raises:
            WouldBlock: none queued.
            BrokenResourceError: the device went away and nothing is queued.
            LocalProtocolError: the NIC is bridged to a TAP (frames go there).
        """
        if self._rxq:
            frame = self._rxq.popleft()
            if not self._rxq:
                self._rx_ready.clear()
            return frame
        if self._closed is not None:
            raise BrokenResourceError(str(self._closed))
        if self.mode == "tap":
            raise LocalProtocolError(
                f"{self.name} is bridged to TAP {self.ifname} in namespace {self.netns}: "
                "receive there"
            )
        raise WouldBlock(f"{self.name}: no frame")

    async def recv(self) -> bytes:
        """Wait for the next received Ethernet frame.

        Raises:
            BrokenResourceError: the device went away and nothing is queued.
            LocalProtocolError: the NIC is bridged to a TAP.
        """
        while True:
            try:
                return self.recv_nowait()
            except WouldBlock:
                self._rx_ready.clear()
                await self._rx_ready.wait()

    async def frames(self) -> AsyncIterator[bytes]:
        """Every received frame until the device goes away."""
        while True:
            try:
                yield await self.recv()
            except BrokenResourceError:
                return
