"""The host end of one boot's control link: typed card messages in, replies matched out.

Owns what the link carries for one boot (:mod:`transport.messages`): decoding
every frame the card OS sent into its message class, handing it to the boot
session, and matching the replies (``devices``, ``run_result``,
``net-params``) to the requests waiting for them by ``id``. A reply completes
only a request this host sent and is still waiting, and only if it is of the
class that answers that request (:func:`transport.messages.reply_type`): a
``devices`` message cannot complete a ``run``. Anything else is the card's
fault and is ignored (a forged reply never reaches the session either). A
frame that does not decode is the card's fault too: it is ignored, as an
unknown message always was; if it carries the ``id`` of a waiting request,
that request fails with the :class:`RemoteProtocolError` instead of waiting
forever. What the card makes us log here goes through the card's log budget
(:class:`virtio.ratelimit.LogBudget`, a few lines per second).

Imports ``transport`` (the link and its messages) and ``virtio`` only:
nothing of ``mic_host`` above it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from transport.link import MessageLink
from transport.messages import (
    AppsReply,
    CardMessage,
    DevicesReply,
    HostMessage,
    NetParamsReply,
    Reply,
    Request,
    RunResult,
    decode_from_card,
    encode,
    reply_type,
)
from virtio.errors import MicError, MicTimeoutError, RemoteProtocolError
from virtio.ratelimit import LimitedLogger, LogBudget

__all__ = ["CardLink", "card_devices"]

_log = logging.getLogger("mic_host.card")


def card_devices(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The card's device list (``online``/``devices`` messages), keeping only
    well-formed entries (``offset`` an int, ``name`` a string): the card is
    untrusted, and status/stats/detach index this list.
    """
    return [d for d in raw if type(d.get("offset")) is int and isinstance(d.get("name"), str)]


class CardLink:
    """One boot's control link, host side (wraps a :class:`MessageLink`)."""

    def __init__(self, card: str, link: MessageLink, log: LimitedLogger | None = None) -> None:
        """``log``: where what the card makes us say goes (default: a budget of our own)."""
        self.card = card
        self.link = link
        self.log = log or LogBudget(card, _log, time.monotonic).logger(_log)
        #: frames that did not decode, and replies that answered nothing we asked
        self.bad_messages = 0
        self.forged_replies = 0
        self._ids = itertools.count(1)
        self._replies: dict[int, tuple[type[Reply], asyncio.Future[Reply]]] = {}

    async def send(self, msg: HostMessage) -> None:
        """Send one message.

        Raises:
            BrokenResourceError: the link is gone.
        """
        await self.link.send(encode(msg))

    async def ask(self, make: Callable[[int], Request], timeout: float | None) -> Reply:
        """Send ``make(id)`` with a fresh ``id`` and wait for the card's reply to it
        (of the class that answers it: :func:`~transport.messages.reply_type`).

        Raises:
            MicTimeoutError: no reply within ``timeout``.
            BrokenResourceError: the link went down meanwhile.
            RemoteProtocolError: the card answered with a malformed reply.
        """
        rid = next(self._ids)
        msg = make(rid)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._replies[rid] = (reply_type(msg), fut)
        try:
            await self.send(msg)
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise MicTimeoutError(f"{self.card}: no answer to {msg.TYPE} in {timeout}s") from None
        finally:
            self._replies.pop(rid, None)

    def fail_replies(self, exc: MicError) -> None:
        """Fail every request still waiting (the boot ended)."""
        for _, fut in self._replies.values():
            if not fut.done():
                fut.set_exception(exc)
        self._replies.clear()

    async def serve(self, handle: Callable[[CardMessage], None]) -> None:
        """Read messages until the link is lost: replies go to their requests,
        every other decoded message to ``handle`` (a reply too, once it
        completed its request; a reply that answers nothing is dropped).

        Raises:
            BrokenResourceError: the link was lost (closed, EOF, bad framing).
        """
        while True:
            obj = await self.link.recv()
            try:
                msg = decode_from_card(obj)
            except RemoteProtocolError as e:
                self._bad(obj, e)
                continue
            if isinstance(
                msg, DevicesReply | RunResult | NetParamsReply | AppsReply
            ) and not self._answer(msg):
                continue
            handle(msg)

    def _answer(self, msg: Reply) -> bool:
        """Complete the request ``msg`` answers; False (and logged) if it answers none."""
        pending = self._replies.get(msg.id)
        if pending is None or pending[1].done():
            why = f"no request {msg.id} is waiting"
        elif not isinstance(msg, pending[0]):
            why = f"request {msg.id} expects {pending[0].TYPE}"
        else:
            del self._replies[msg.id]
            pending[1].set_result(msg)
            return True
        self.forged_replies += 1
        self.log.warning("%s: ignored a %s reply from the card: %s", self.card, msg.TYPE, why)
        return False

    def _bad(self, obj: dict[str, Any], err: RemoteProtocolError) -> None:
        self.bad_messages += 1
        self.log.warning("%s: bad message from card (%s): %.200r", self.card, err, obj)
        rid = obj.get("id")
        if type(rid) is int:
            pending = self._replies.pop(rid, None)
            if pending is not None and not pending[1].done():
                pending[1].set_exception(err)
