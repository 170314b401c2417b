"""Card apps seen from the daemon: run one (and cancel it on the card), list, kill.

The ``run``, ``apps`` and ``kill`` operations of a card (``micctl run/apps/kill``,
``CardClient.run/apps/kill``). The code of an app arrives with the request (the
client collected it, :mod:`mic_host.client.apps`); the daemon checks its shape
and size (:class:`transport.appcode.AppCode`) and forwards it in the ``run``
link message. A run the caller gives up on (its ``timeout``, a cancelled
request, a client that hung up) is cancelled on the card too: a ``kill-app``
by the run's tag, sent from a task of the card manager, which then waits a
bounded time for the card's (cancelled) result so that reply is not taken
for a forged one.

Part of ``mic_host.card``: imports the link dispatch and ``transport``; the
card manager calls these functions with itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from mic_host.card.dispatch import CardLink
from transport.appcode import APP_FAILED_MARK, AppCode
from transport.messages import AppsReply, AppsRequest, KillApp, Reply, Run, RunResult
from virtio.errors import (
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    RemoteProtocolError,
)

__all__ = ["AppOwner", "kill_app", "list_apps", "run_app"]

log = logging.getLogger("mic_host.card")

#: Seconds to wait for the card to confirm a kill (and send the cancelled result).
KILL_WAIT = 5.0
#: Seconds a cancelled run's reply is still awaited after the kill.
REAP_WAIT = 10.0

_tags = itertools.count(1)


class AppOwner(Protocol):
    """What these functions need of the card manager."""

    name: str

    def _online_link(self) -> CardLink: ...
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]: ...


async def run_app(
    owner: AppOwner,
    app: str,
    args: list[Any],
    *,
    code: dict[str, Any] | None = None,
    tag: str | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``module:function`` on the card OS (with its ``code`` if sent); its result.

    Raises:
        LocalProtocolError: card not online.
        RemoteProtocolError: malformed ``code`` (over the size limit...), or the
            app failed (its error type and message, then :data:`APP_FAILED_MARK`
            and its card-side traceback if it raised).
        MicError: the app was cancelled on the card (``micctl kill``).
        MicTimeoutError: not finished within ``timeout`` (it was cancelled on the card).
        BrokenResourceError: the card went down meanwhile.
    """
    if code is not None:
        try:
            AppCode.from_wire(code)
        except RemoteProtocolError as e:
            raise RemoteProtocolError(f"app {app}: {e}", reason="bad-request") from None
    link = owner._online_link()
    run_tag = tag or f"daemon-{next(_tags)}"
    reply_task: asyncio.Task[Reply] = asyncio.get_running_loop().create_task(
        link.ask(lambda rid: Run(id=rid, app=app, args=args, code=code, tag=run_tag), None),
        name=f"{owner.name} app {app}",
    )
    try:
        async with asyncio.timeout(timeout):
            reply = await asyncio.shield(reply_task)
    except TimeoutError:
        owner._spawn(_cancel_on_card(owner.name, link, run_tag, reply_task))
        raise MicTimeoutError(
            f"app {app} did not finish on {owner.name} in {timeout}s: cancelled it"
        ) from None
    except asyncio.CancelledError:
        owner._spawn(_cancel_on_card(owner.name, link, run_tag, reply_task))
        raise
    if not isinstance(reply, RunResult):
        raise RemoteProtocolError(f"{owner.name} answered run with {reply.TYPE}")
    if not reply.ok:
        err = reply.error
        assert err is not None  # RunResult.problem
        if err.type == "AppCancelled":
            raise MicError(err.message)
        text = f"app {app} failed on {owner.name}: {err.type}: {err.message}"
        if reply.traceback:
            text += APP_FAILED_MARK + reply.traceback
        raise RemoteProtocolError(text, reason="app")
    return {"card": owner.name, "app": app, "value": reply.result}


async def _cancel_on_card(
    card: str, link: CardLink, tag: str, reply_task: asyncio.Task[Reply]
) -> None:
    """Kill the run tagged ``tag`` on the card; then let its reply arrive (bounded)."""
    try:
        await link.ask(lambda rid: KillApp(id=rid, tag=tag), KILL_WAIT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reply_task), REAP_WAIT)
    except MicError as e:
        log.info("%s: cancelling app run %s on the card: %s", card, tag, e)
    finally:
        if not reply_task.done():
            reply_task.cancel()
        with contextlib.suppress(BaseException):
            await reply_task


async def list_apps(owner: AppOwner) -> dict[str, Any]:
    """``{"card", "apps": [{"id", "app", "tag", "started", "elapsed"}]}``.

    Raises:
        LocalProtocolError: card not online.
        MicTimeoutError: the card did not answer.
    """
    reply = await owner._online_link().ask(lambda rid: AppsRequest(id=rid), KILL_WAIT)
    if not isinstance(reply, AppsReply):
        raise RemoteProtocolError(f"{owner.name} answered apps with {reply.TYPE}")
    return {"card": owner.name, "apps": _apps(reply)}


async def kill_app(owner: AppOwner, app_id: int | None, tag: str | None) -> dict[str, Any]:
    """Cancel the app with ``app_id`` (or started with ``tag``) on the card.

    Raises:
        LocalProtocolError: card not online, neither or both of ``app_id``/``tag``,
            or no such app running.
        MicTimeoutError: the card did not answer.
    """
    if (app_id is None) == (tag is None):
        raise LocalProtocolError("kill: give exactly one of an app id and a tag")
    make: Callable[[int], KillApp] = lambda rid: KillApp(id=rid, app=app_id, tag=tag)  # noqa: E731
    reply = await owner._online_link().ask(make, KILL_WAIT)
    if not isinstance(reply, AppsReply):
        raise RemoteProtocolError(f"{owner.name} answered kill-app with {reply.TYPE}")
    killed = _apps(reply)
    if not killed and app_id is not None:
        raise LocalProtocolError(f"no app {app_id} is running on {owner.name} (see micctl apps)")
    return {"card": owner.name, "killed": killed}


def _apps(reply: AppsReply) -> list[dict[str, Any]]:
    """The card's list, keeping well-formed entries only (the card is untrusted)."""
    return [
        {
            "id": a["id"],
            "app": a["app"][:200],
            "tag": a.get("tag") if isinstance(a.get("tag"), str) else None,
            "started": a.get("started") if _num(a.get("started")) else None,
            "elapsed": a.get("elapsed") if _num(a.get("elapsed")) else None,
        }
        for a in reply.apps[:1000]
        if type(a.get("id")) is int and isinstance(a.get("app"), str)
    ]


def _num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
