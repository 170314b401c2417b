"""The host end of one boot's control link: typed card messages in, replies matched out.

Owns what the link carries for one boot (:mod:`transport.messages`): decoding
every frame the card OS sent into its message class, handing it to the boot
session, and matching the replies (``devices``, ``run_result``,
``net-params``) to the requests waiting for them by ``id``. A frame that does
not decode is the card's fault: it is logged (a bounded number of times per
boot) and otherwise ignored, as an unknown message always was; if it carries
the ``id`` of a waiting request, that request fails with the
:class:`RemoteProtocolError` instead of waiting forever.

Imports ``transport`` (the link and its messages) and ``virtio.errors`` only:
nothing of ``mic_host`` above it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

from transport.link import MessageLink
from transport.messages import (
    CardMessage,
    DevicesReply,
    HostMessage,
    NetParamsReply,
    RunResult,
    decode_from_card,
    encode,
)
from virtio.errors import MicError, MicTimeoutError, RemoteProtocolError

__all__ = ["MAX_BAD_MESSAGE_LOGS", "CardLink", "card_devices"]

log = logging.getLogger("mic_host.card")

#: Bad frames logged per boot; after that one line says the rest are not.
MAX_BAD_MESSAGE_LOGS = 10

Reply = DevicesReply | RunResult | NetParamsReply


def card_devices(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The card's device list (``online``/``devices`` messages), keeping only
    well-formed entries (``offset`` an int, ``name`` a string): the card is
    untrusted, and status/stats/detach index this list.
    """
    return [d for d in raw if type(d.get("offset")) is int and isinstance(d.get("name"), str)]


class CardLink:
    """One boot's control link, host side (wraps a :class:`MessageLink`)."""

    def __init__(self, card: str, link: MessageLink) -> None:
        self.card = card
        self.link = link
        self.bad_messages = 0
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[Reply]] = {}

    async def send(self, msg: HostMessage) -> None:
        """Send one message.

        Raises:
            BrokenResourceError: the link is gone.
        """
        await self.link.send(encode(msg))

    async def ask(self, make: Callable[[int], HostMessage], timeout: float | None) -> Reply:
        """Send ``make(id)`` with a fresh ``id`` and wait for the card's reply to it.

        Raises:
            MicTimeoutError: no reply within ``timeout``.
            BrokenResourceError: the link went down meanwhile.
            RemoteProtocolError: the card answered with a malformed reply.
        """
        rid = next(self._ids)
        msg = make(rid)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
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
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(exc)
        self._replies.clear()

    async def serve(self, handle: Callable[[CardMessage], None]) -> None:
        """Read messages until the link is lost: replies go to their requests,
        every decoded message to ``handle``.

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
            if isinstance(msg, DevicesReply | RunResult | NetParamsReply):
                fut = self._replies.pop(msg.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            handle(msg)

    def _bad(self, obj: dict[str, Any], err: RemoteProtocolError) -> None:
        self.bad_messages += 1
        if self.bad_messages <= MAX_BAD_MESSAGE_LOGS:
            log.warning("%s: bad message from card (%s): %.200r", self.card, err, obj)
            if self.bad_messages == MAX_BAD_MESSAGE_LOGS:
                log.warning("%s: further bad messages from this boot are not logged", self.card)
        rid = obj.get("id")
        if type(rid) is int:
            fut = self._replies.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_exception(err)
