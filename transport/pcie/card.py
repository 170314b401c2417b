"""The card end of one card's PCIe link: :class:`PcieCard`.

Reaches the host (a path, or the card end of the host's socket pair it was
handed), runs the card half of the handshake, checks and maps what the
offer carries (sealed memfds of the announced sizes, eventfds), and owns the
message link to the host.

Imports the transport modules below ``pcie``, :mod:`transport.pcie.common`
and ``virtio``; never :mod:`transport.pcie.host`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from types import TracebackType
from typing import Self

from transport.dma import DmaEngine, DmaPolicy
from transport.errors import HandshakeError, LinkLost, RegionError
from transport.handshake import REGIONS, Hello, Offer, Ready, Refuse
from transport.link import DEFAULT_MAX_MESSAGE, FramedSocket, MessageLink
from transport.mmio import Mmio
from transport.notify import NotifyPolicy
from transport.pcie.common import is_eventfd, link_tasks
from transport.region import Region
from transport.space import CardAddressSpace
from virtio.errors import ClosedResourceError, LocalProtocolError, MicTimeoutError

__all__ = ["PcieCard"]


class PcieCard:
    """Card side of the link; an async context manager.

    ``async with PcieCard.connect(path) as card:`` connects, runs the handshake
    and maps everything; ``path`` may also be an already connected socket (the
    card end of a host's socket pair, :attr:`PcieHost.card_fd`), which it owns.
    Then: ``card.card_ram`` (Region), ``card.space`` (card-physical address
    space with the SMPT windows), ``card.mmio``, ``card.link``,
    ``card.boot_params``, ``card.identity``, and ``card.dma()`` to open a DMA
    engine over ``card.space``.

    Raises on entry:
        LinkLost: the host socket is not there / refused the connection / vanished.
        HandshakeError: the host refused us, or its offer was malformed or incomplete.
        MicTimeoutError: no offer within ``timeout`` seconds.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | socket.socket,
        *,
        expect_card: str | None = None,
        notify: NotifyPolicy | None = None,
        dma: DmaPolicy | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._given = path if isinstance(path, socket.socket) else None
        self.path = os.fspath(path) if not isinstance(path, socket.socket) else None
        self._expect = expect_card
        self._notify = notify
        self._dma_policy = dma
        self._timeout = timeout
        self._stack = contextlib.AsyncExitStack()
        self._tg: asyncio.TaskGroup | None = None
        self._reader: asyncio.Task[None] | None = None
        self._link: MessageLink | None = None
        self._entered = False
        self._closed = False

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str] | socket.socket,
        *,
        expect_card: str | None = None,
        notify: NotifyPolicy | None = None,
        dma: DmaPolicy | None = None,
        timeout: float = 10.0,
    ) -> PcieCard:
        """``async with PcieCard.connect(path_or_socket) as card`` (same as the constructor)."""
        return cls(path, expect_card=expect_card, notify=notify, dma=dma, timeout=timeout)

    async def __aenter__(self) -> Self:
        if self._entered:
            raise LocalProtocolError("PcieCard can be entered once")
        self._entered = True
        try:
            await self._setup()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _setup(self) -> None:
        loop = asyncio.get_running_loop()
        if self._given is not None:
            sock, self._given = self._given, None
            sock.setblocking(False)
        else:
            assert self.path is not None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.path)
            except OSError as e:
                sock.close()
                raise LinkLost(f"cannot reach the host at {self.path}: {e}") from e
        fs = FramedSocket(sock, DEFAULT_MAX_MESSAGE)
        try:
            async with asyncio.timeout(self._timeout):
                await self._handshake(fs)
        except TimeoutError as e:
            fs.close()
            raise MicTimeoutError(f"no handshake from the host within {self._timeout} s") from e
        except BaseException:
            fs.close()
            raise
        fs.max_message = self.max_message
        link = MessageLink(fs)
        self._link = link
        link.add_lost_callback(self.mmio.fail)
        await self._stack.enter_async_context(link_tasks(self))
        assert self._tg is not None
        self._reader = self._tg.create_task(link.run(), name="card-link")

    def dma(self, policy: DmaPolicy | None = None) -> DmaEngine:
        """A DMA engine over :attr:`space` (``policy`` defaults to the ``dma=`` given
        to :meth:`connect`): ``async with card.dma() as dma: await dma.copy(...)``.
        The caller owns it; close it before the link.
        """
        return DmaEngine(self.space, policy or self._dma_policy)

    async def _handshake(self, fs: FramedSocket) -> None:
        await fs.send_frame(Hello(card=self._expect).to_wire())
        obj, fds = await fs.recv_frame()
        refusal = Refuse.from_wire(obj)
        try:
            if refusal is not None:
                raise HandshakeError(
                    f"host refused: {refusal.reason}: {refusal.message}", reason=refusal.reason
                )
            self._take_offer(Offer.from_wire(obj), fds)  # consumes fds
            fds = []
        except HandshakeError as e:
            for fd in fds:
                os.close(fd)
            if e.reason != "refused" and refusal is None:
                with contextlib.suppress(LinkLost, ClosedResourceError, OSError):
                    await fs.send_frame(Refuse(e.reason, str(e)).to_wire())
            raise
        await fs.send_frame(Ready().to_wire())

    def _take_offer(self, offer: Offer, fds: list[int]) -> None:
        layout, ident, sizes = offer.layout, offer.card, offer.regions
        want = len(REGIONS) + layout.card_vectors + layout.host_vectors
        if len(fds) != want:
            raise HandshakeError(f"offer carried {len(fds)} fds, expected {want}", reason="fds")
        if self._expect is not None and ident.name != self._expect:
            raise HandshakeError(f"host offers card {ident.name!r}, expected {self._expect!r}",
                                 reason="identity")  # fmt: skip
        vec_fds = fds[len(REGIONS) :]
        bad = [fd for fd in vec_fds if not is_eventfd(fd)]
        if bad:
            raise HandshakeError(f"{len(bad)} vector fds are not eventfds", reason="fds")
        # from here on, ownership moves fd by fd into objects the exit stack closes
        st = self._stack
        regs: list[Region] = []
        for i, name in enumerate(REGIONS):
            try:
                region = Region.adopt(name, fds[i], sizes[name])
            except RegionError as e:
                for fd in fds[i + 1 :]:
                    os.close(fd)
                raise HandshakeError(f"bad region: {e}", reason="region") from e
            regs.append(region)
            if name != "mmio":
                st.callback(region.close)
        card_ram, host_ram, mmio_region = regs
        h2c = tuple(vec_fds[: layout.card_vectors])
        c2h = tuple(vec_fds[layout.card_vectors :])
        self.mmio = Mmio.adopt(mmio_region, layout, h2c, c2h, self._notify)  # owns them now
        st.callback(self.mmio.close)
        self.card_ram = card_ram
        self._host_ram = host_ram
        self.space = CardAddressSpace(card_ram, host_ram, self.mmio.words)
        st.callback(self.space.release)
        self.identity = ident
        self.boot_params = offer.boot
        self.layout = layout
        self.max_message = offer.max_message
        self.region_sizes = sizes

    async def aclose(self) -> None:
        """Close the link, unmap everything (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._given is not None:  # never entered: the socket we were given
            self._given.close()
            self._given = None
        await self._stack.aclose()
        if self._link is not None:
            self._link.close()  # idempotent: also when the task group never opened

    @property
    def link(self) -> MessageLink:
        """The message link to the host."""
        if self._link is None:
            raise ClosedResourceError("card is not connected")
        return self._link
