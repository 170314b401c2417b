"""The card's network namespace: created and deleted by the daemon, which outlives the card.

A card NIC whose card side will open a TAP (``card_mode`` ``auto`` or
``tap``, and the daemon privileged: :func:`transport.tap.tap_privilege_problem`
is None) puts that TAP in a namespace of its own (``card_netns``, default the
card's name). The daemon is its one owner; the card only opens its TAP inside
it:

- the net backend *acquires* it when it is built, before the card boots or
  the NIC is hot-added (:meth:`NetnsOwner.acquire`): a namespace this owner
  made already (an earlier boot of the card) is reused as it is; one
  recorded in ``STATE_DIR/CARD-DEVICE.netns`` but not made by this owner (a
  daemon that died) is deleted and made again; one not recorded is foreign
  and refused with :class:`~virtio.errors.ConfigError`;
- it is *released* when the device goes for good: detached, or the daemon
  stops (:meth:`NetnsOwner.release`, called by the card's device set), never
  when the card reboots. The last device using it deletes it and its record.

One :class:`NetnsOwner` per ``net`` backend factory (so, per daemon process).

Imports ``transport.tap`` and ``virtio.errors``; nothing of the package.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from transport.tap import (
    TapError,
    create_netns_sync,
    delete_netns,
    delete_netns_sync,
    netns_exists,
    tap_privilege_problem,
)
from virtio.errors import ConfigError

__all__ = ["NetnsOwner", "card_needs_netns"]

log = logging.getLogger("mic_host.backends.net")


def card_needs_netns(card_mode: str, card_netns: str | None) -> bool:
    """Whether the card side will open a TAP in ``card_netns`` (so the daemon
    must provide the namespace): tap mode possible and the daemon privileged."""
    return card_mode != "frames" and bool(card_netns) and tap_privilege_problem() is None


def _recorded(record: Path | None) -> str | None:
    if record is None:
        return None
    with contextlib.suppress(OSError):
        return record.read_text().strip() or None
    return None


def _forget(record: Path | None) -> None:
    if record is not None:
        with contextlib.suppress(OSError):
            record.unlink()


class NetnsOwner:
    """The card namespaces one daemon made, and which devices use each."""

    def __init__(self) -> None:
        #: namespace -> the records (one per device) of the devices using it
        self._users: dict[str, set[Path | None]] = {}

    def owns(self, ns: str) -> bool:
        return ns in self._users

    def acquire(self, ns: str, record: Path | None) -> None:
        """Make sure namespace ``ns`` exists and is ours, for the device whose
        record file is ``record`` (``STATE_DIR/CARD-DEVICE.netns``, or None).

        Blocks on ``ip`` (a few ms) when it has to create or delete one.

        Raises:
            ConfigError: the namespace exists and is not recorded as ours, a
                leftover cannot be deleted, the record cannot be written, or
                ``ip`` failed (TapError).
        """
        if ns not in self._users:
            if netns_exists(ns):
                if _recorded(record) != ns:
                    raise ConfigError(
                        f"network namespace {ns!r} already exists (not created by this "
                        "daemon): remove it or set card_netns"
                    )
                log.warning("deleting namespace %s left by a previous daemon", ns)
                delete_netns_sync(ns)
            create_netns_sync(ns)
            self._users[ns] = set()
            log.info("created network namespace %s for the card", ns)
        users = self._users[ns]
        if record is not None and record not in users:
            try:
                record.write_text(ns + "\n")
            except OSError as e:
                if not users:
                    del self._users[ns]
                    with contextlib.suppress(TapError):
                        delete_netns_sync(ns)
                raise ConfigError(f"cannot write {record}: {e.strerror}") from e
        users.add(record)

    async def release(self, record: Path | None, ns: str | None = None) -> None:
        """The device recorded in ``record`` is gone for good: forget it, and
        delete its namespace when no device uses it any more. A record this
        owner does not know is left alone. Never raises (a namespace that
        cannot be deleted is logged).
        """
        ns = ns or next((n for n, users in self._users.items() if record in users), None)
        if ns is None or ns not in self._users:
            return
        users = self._users[ns]
        users.discard(record)
        _forget(record)
        if users:
            return
        del self._users[ns]
        try:
            await delete_netns(ns)
        except TapError as e:
            log.warning("cannot delete namespace %s: %s", ns, e)
        else:
            log.info("deleted network namespace %s", ns)
