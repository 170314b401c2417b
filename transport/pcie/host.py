"""The host end of one card's PCIe link: :class:`PcieHost`.

Owns the card's regions, MMIO, eventfds, SMPT and aperture for one boot, the
way the card reaches it (a socket pair handed to the one card process, or a
listening path served concurrently; see :mod:`transport.pcie`), the host
half of the handshake, and the message link once the card is in.

Imports the transport modules below ``pcie``, :mod:`transport.pcie.common`
and ``virtio``; never :mod:`transport.pcie.card`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from transport.dma import DmaEngine, DmaPolicy
from transport.errors import HandshakeError, LinkLost
from transport.handshake import CardIdentity, Hello, Offer, Ready, Refuse
from transport.link import FramedSocket, MessageLink
from transport.mmio import Mmio
from transport.notify import NotifyPolicy
from transport.pcie.common import PcieConfig, json_dict, link_tasks, refuse
from transport.region import Region
from transport.space import HostAddressSpace, SmptTable
from virtio.errors import (
    ClosedResourceError,
    LocalProtocolError,
    MicTimeoutError,
    RemoteProtocolError,
)
from virtio.ratelimit import LogBudget

__all__ = ["MAX_HANDSHAKES", "MAX_REFUSALS", "PcieHost", "RefusalError"]

log = logging.getLogger("transport.pcie")

#: what ``PcieHost.refused`` records for each refused peer
RefusalError = RemoteProtocolError | LinkLost | MicTimeoutError
#: handshakes a listening host serves at once (more connections wait in the backlog)
MAX_HANDSHAKES = 16
#: refusals ``PcieHost.refused`` keeps (the newest)
MAX_REFUSALS = 64


class PcieHost:
    """Host side of one card's PCIe link; an async context manager.

    On entry it creates the card's regions (card RAM, host RAM, MMIO + eventfds),
    the SMPT and the aperture address space, and listens on ``path`` (mode
    0600), or with ``path=None`` creates a socket pair whose card end
    (:attr:`card_fd`) the caller hands to the card process it spawns, then
    closes with :meth:`close_card_end`. All of them are usable before the card
    connects (write the device page, open windows, set SPAD14/15, DMA into card
    RAM with :meth:`dma`).
    :meth:`accept` then waits for a card to complete the handshake and returns
    the :class:`MessageLink`. One ``PcieHost`` serves one boot: to boot the card
    again, close it and create a new one (fresh regions, as after a reset).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        card: CardIdentity | None = None,
        config: PcieConfig | None = None,
        boot_params: Mapping[str, Any] | None = None,
        notify: NotifyPolicy | None = None,
        dma: DmaPolicy | None = None,
        enforce_windows: bool = True,
    ) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.identity = card or CardIdentity()
        self.config = config or PcieConfig()
        self.boot_params = json_dict(boot_params or {}, "boot_params")
        self._notify = notify
        self._dma_policy = dma
        self._enforce = enforce_windows
        #: the newest refusals (why each peer was refused), and how many there were
        self.refused: collections.deque[RefusalError] = collections.deque(maxlen=MAX_REFUSALS)
        self.refusals = 0
        self._log = LogBudget(f"card {self.identity.name}", log, time.monotonic).logger(log)
        self._stack = contextlib.AsyncExitStack()
        self._sock: socket.socket | None = None
        self._pair: socket.socket | None = None  # our end of the socket pair
        self._card_end: socket.socket | None = None
        self._sock_ino: int | None = None
        self._link: MessageLink | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None  # set while _link_tasks() is open
        self._entered = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if self._entered:
            raise LocalProtocolError("PcieHost can be entered once")
        self._entered = True
        try:
            await self._setup()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _setup(self) -> None:
        cfg = self.config
        st = self._stack
        self.card_ram = st.enter_context(Region.create("card_ram", cfg.card_ram_size))
        self.host_ram = st.enter_context(Region.create("host_ram", cfg.host_ram_size))
        self.mmio = Mmio.create(cfg.layout, self._notify)
        st.callback(self.mmio.close)
        self.smpt = SmptTable(self.mmio.words, cfg.host_ram_size)
        self.aperture = HostAddressSpace(
            self.card_ram, self.host_ram, self.smpt, enforce_windows=self._enforce
        )
        st.callback(self.aperture.release)
        await st.enter_async_context(link_tasks(self))
        if self.path is None:
            st.callback(self._close_pair)
            self._pair, self._card_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._pair.setblocking(False)
        else:
            self._listen()
            st.callback(self._unlisten)

    @property
    def card_fd(self) -> int:
        """The card's end of the socket pair: hand it to the card process
        (``pass_fds``), which connects with ``PcieCard(socket.socket(fileno=fd))``.

        Raises:
            LocalProtocolError: this host listens on a path, or the end was closed.
        """
        if self._card_end is None:
            raise LocalProtocolError("no card end to hand over (a path host, or closed)")
        return self._card_end.fileno()

    def close_card_end(self) -> None:
        """Close our copy of the card's end (after the card process has it), so
        the card's death reads as EOF on the link. Idempotent."""
        if self._card_end is not None:
            self._card_end.close()
            self._card_end = None

    def _close_pair(self) -> None:
        self.close_card_end()
        if self._pair is not None:
            self._pair.close()  # unless a FramedSocket took it over (then it closes it)
            self._pair = None

    def dma(self, policy: DmaPolicy | None = None) -> DmaEngine:
        """A DMA engine over the aperture (``policy`` defaults to the ``dma=`` given
        to the constructor): ``async with host.dma() as dma: await dma.copy(...)``.
        The caller owns it; close it before the link.
        """
        return DmaEngine(self.aperture, policy or self._dma_policy)

    def _listen(self) -> None:
        p = self.path
        assert p is not None
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise LocalProtocolError(f"{p} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(p)
            except OSError:
                os.unlink(p)  # stale socket of a dead host
            else:
                raise LocalProtocolError(f"{p}: another host is listening there")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(p)
            os.chmod(p, 0o600)  # before listen(): nobody can connect in between
            self._sock_ino = os.lstat(p).st_ino
            sock.listen(4)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _unlisten(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                if self.path is not None and os.lstat(self.path).st_ino == self._sock_ino:
                    os.unlink(self.path)

    async def aclose(self) -> None:
        """Close the link, unlink the socket, free everything (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await self._stack.aclose()

    # -- the card --------------------------------------------------------------
    @property
    def link(self) -> MessageLink:
        """The message link to the card (after :meth:`accept`).

        Raises:
            LocalProtocolError: no card has connected yet.
        """
        if self._link is None:
            raise LocalProtocolError("no card connected yet (await accept() first)")
        return self._link

    @property
    def card_pid(self) -> int | None:
        return self._link.peer_pid if self._link is not None else None

    async def accept(self, *, card_pid: int | None = None) -> MessageLink:
        """Wait for the card to complete the handshake; returns the link.

        ``card_pid`` names the card process when the caller spawned it on the
        socket pair (``SO_PEERCRED`` there names the pair's creator, us); on a
        path the kernel's credentials are used.

        On a path, a peer that fails the handshake is refused, recorded in
        ``refused``, and the host keeps waiting; peers are served concurrently,
        each within ``config.handshake_timeout``. On a socket pair the one peer
        has no timeout until it sends its first byte (the caller bounds the
        boot), then ``handshake_timeout``. Use ``asyncio.timeout`` to bound the wait.

        Raises:
            LocalProtocolError: a card is already connected.
            ClosedResourceError: the host is closed.
            HandshakeError, LinkLost, MicTimeoutError: (socket pair only) the
                card failed the handshake; there is no other peer to wait for.
        """
        if self._link is not None:
            raise LocalProtocolError("a card is already connected to this PcieHost")
        if (self._sock is None and self._pair is None) or self._tg is None:
            raise ClosedResourceError("PcieHost is not open")
        paired = self._pair is not None
        if self._pair is not None:
            fs = await self._accept_pair(self._pair)
        else:
            assert self._sock is not None
            fs = await self._accept_listening(self._sock)
        link = MessageLink(fs)
        if card_pid is not None and paired:
            link.peer_pid = card_pid
        self._link = link
        link.add_lost_callback(self.mmio.fail)
        self._reader = self._tg.create_task(link.run(), name=f"{self.identity.name}-link")
        log.info("card %s connected (pid %s)", self.identity.name, link.peer_pid)
        return link

    async def _accept_pair(self, sock: socket.socket) -> FramedSocket:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(sock.fileno(), readable)
        try:
            await ready  # the card process is starting: no deadline until it speaks
        finally:
            loop.remove_reader(sock.fileno())
        self._pair = None  # the FramedSocket owns it now
        fs = FramedSocket(sock, self.config.max_message)
        ok = await self._serve_handshake(fs)
        if not ok:
            raise self.refused[-1]
        return fs

    async def _accept_listening(self, lsock: socket.socket) -> FramedSocket:
        """Serve handshakes concurrently until one completes; the others are closed.

        Connections are accepted in a reader callback (never by a task that
        could be cancelled holding an accepted socket), at most
        :data:`MAX_HANDSHAKES` in progress; more wait in the listen backlog.
        """
        loop = asyncio.get_running_loop()
        won: asyncio.Future[FramedSocket] = loop.create_future()
        conns: list[FramedSocket] = []
        peers: set[asyncio.Task[None]] = set()
        fd = lsock.fileno()
        reading = stopping = False

        def listen(on: bool) -> None:
            nonlocal reading
            if on and not reading and not stopping:
                loop.add_reader(fd, accept_ready)
                reading = True
            elif not on and reading:
                loop.remove_reader(fd)
                reading = False

        async def one(fs: FramedSocket) -> None:
            try:
                if await self._serve_handshake(fs) and not won.done():
                    won.set_result(fs)
                else:
                    fs.close()
            finally:
                conns.remove(fs)
                if fs.closed:
                    listen(True)  # a slot is free again

        def accept_ready() -> None:
            while len(conns) < MAX_HANDSHAKES:
                try:
                    conn, _ = lsock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:  # out of fds, say: breathe, then accept again
                    self._log.warning("card %s: accept failed: %s", self.identity.name, e)
                    listen(False)
                    loop.call_later(0.1, listen, True)
                    return
                fs = FramedSocket(conn, self.config.max_message)
                conns.append(fs)
                task = tg.create_task(one(fs))
                peers.add(task)
                task.add_done_callback(peers.discard)
            listen(False)  # every slot taken: the rest wait in the backlog

        winner: FramedSocket | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                listen(True)
                try:
                    winner = await won
                finally:
                    stopping = True  # a slot freed from now on accepts nobody
                    listen(False)
                    for task in list(peers):
                        task.cancel()  # the losers
        finally:
            listen(False)
            for fs in conns:  # also those whose task never got to run
                if fs is not winner:
                    fs.close()
        assert winner is not None
        return winner

    async def _serve_handshake(self, fs: FramedSocket) -> bool:
        """One peer's handshake within the timeout; False (and recorded) if refused."""
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                await self._handshake(fs)
        except TimeoutError:
            fs.close()
            self._refuse(MicTimeoutError("card handshake timed out"))
            return False
        except (RemoteProtocolError, LinkLost) as e:
            fs.close()
            self._refuse(e)
            return False
        except BaseException:
            fs.close()
            raise
        return True

    def _refuse(self, err: RefusalError) -> None:
        self.refused.append(err)
        self.refusals += 1
        self._log.warning("card %s: refused a peer: %s", self.identity.name, err)

    def _offer(self) -> dict[str, Any]:
        cfg = self.config
        return Offer(
            card=self.identity,
            regions={
                "card_ram": cfg.card_ram_size,
                "host_ram": cfg.host_ram_size,
                "mmio": cfg.layout.size,
            },
            layout=cfg.layout,
            max_message=cfg.max_message,
            boot=self.boot_params,
        ).to_wire()

    async def _handshake(self, fs: FramedSocket) -> None:
        obj, fds = await fs.recv_frame()
        if fds:
            for fd in fds:
                os.close(fd)
            raise await refuse(fs, "fds", "hello must not carry fds")
        try:
            hello = Hello.from_wire(obj)
        except HandshakeError as e:
            raise await refuse(fs, e.reason, str(e)) from e
        want = hello.card
        if want is not None and want != self.identity.name:
            raise await refuse(
                fs, "identity", f"this socket serves {self.identity.name!r}, not {want!r}"
            )
        fds_out = [self.card_ram.fd, self.host_ram.fd, self.mmio.region.fd, *self.mmio.eventfds]
        await fs.send_frame(self._offer(), fds_out)
        reply, fds = await fs.recv_frame()
        if fds:
            for fd in fds:
                os.close(fd)
            raise await refuse(fs, "fds", "ready must not carry fds")
        refusal = Refuse.from_wire(reply)
        if refusal is not None:
            raise HandshakeError(
                f"card refused the offer: {refusal.reason}: {refusal.message}",
                reason=refusal.reason,
            )
        try:
            Ready.from_wire(reply)
        except HandshakeError as e:
            raise await refuse(fs, e.reason, str(e)) from e
