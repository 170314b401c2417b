"""Card apps of the seeded hostile-card campaign (issue 14) and of its healthy neighbour.

Run inside ``mic-card`` processes (``tests.integration.hostile_campaign:fn``):

- :func:`campaign` plays a hostile card. From a seed it does *rounds*, each one
  hostile write into a device's rings or device-page entry followed by a kick
  (random descriptors and avail entries, descriptor loops, bad indirect
  tables, out-of-window addresses, a used ring moved after DRIVER_OK,
  device-page garbage, doorbell floods), in *episodes* of a few rounds on one
  device, and resets that device (vdev reset and re-probe, what a driver does
  after DEVICE_NEEDS_RESET) between episodes. It writes card memory directly,
  behind its own drivers' backs, the way a buggy or hostile card OS would.
- :func:`giant_console_chain` posts one valid transmit chain of many large
  buffers on the console (issue 14 item 1); :func:`link_nested` sends a link
  frame nested 200,000 deep (item 2); :func:`link_spam` connects to another
  card's link socket over and over, some connections held with half a hello
  (item 5). ``bench.isolation`` plays them on request.
- :func:`verified_io` is the healthy neighbour: block writes of a seeded pattern,
  read back and compared, with each operation's latency.

Imports only the card side (``mic_card`` through the ``card`` object, ``virtio``)
and the standard library; ``bench.isolation`` and
``tests/integration/test_isolation.py`` run these apps by name.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from virtio.devpage import C2H_DOORBELLS, Ctrl, vring_info_offset
from virtio.errors import MicError
from virtio.layouts import MicVringInfo, field_offset

SECTOR = 512
NEEDS_RESET = 0x40
DRIVER_OK = 0x4
_DESC = struct.Struct("<QIHH")
_NEXT, _WRITE, _INDIRECT = 1, 2, 4
#: The card-physical base of host RAM windows (``transport.SMPT_BASE``).
_SMPT_BASE = 0x80_0000_0000
#: Longest buffer a random descriptor gets on a console queue. The console
#: backend copies a whole transmit chain (issue 14 item 1): random lengths up to
#: the card's RAM size would make every round that attack, which
#: :func:`giant_console_chain` plays on purpose instead.
_CONSOLE_MAX_LEN = 1 << 16


class _Target:
    """One queue of one device of the hostile card, and what the attacks write there."""

    def __init__(self, card: Any, name: str, rng: random.Random, scratch: int) -> None:
        self.card = card
        self.name = name
        self.dev = card.bus.device(name)
        self.rng = rng
        self.mem = card.memory
        self.scratch = scratch  # 4 KiB of card RAM for indirect tables
        self.qi = rng.randrange(len(self.dev.endpoints))
        self.layout = self.dev.endpoints[self.qi].queue.layout
        self.size = self.layout.size
        self.max_len = _CONSOLE_MAX_LEN if self.dev.type == 3 else 1 << 24
        self.c2h_db = self.dev.view.ctrl(Ctrl.C2H_VDEV_DB)

    def repair(self) -> None:
        """Put back the doorbell the host chose (``c2h_vdev_db``): a card that scribbled
        over it cannot even ask for a reset, only a card reset would bring it back."""
        self.dev.view.set_ctrl(Ctrl.C2H_VDEV_DB, self.c2h_db)

    # -- building blocks ----------------------------------------------------------------
    def kick(self) -> None:
        self.dev._notify_host()

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        view = self.mem.view(self.layout.desc + 16 * (i % self.size), 16, True)
        _DESC.pack_into(
            view, 0, addr & (2**64 - 1), length & (2**32 - 1), flags & 0xFFFF, nxt & 0xFFFF
        )

    def publish(self, *heads: int, jump: int | None = None) -> None:
        """Append ``heads`` to the avail ring, then move ``avail.idx`` by ``jump``."""
        idx_view = self.mem.view(self.layout.avail + 2, 2, True)
        idx = int.from_bytes(idx_view, "little")
        for k, head in enumerate(heads):
            slot = self.layout.avail + 4 + 2 * ((idx + k) % self.size)
            self.mem.view(slot, 2, True)[:] = (head & 0xFFFF).to_bytes(2, "little")
        step = len(heads) if jump is None else jump
        idx_view[:] = ((idx + step) & 0xFFFF).to_bytes(2, "little")

    def addr(self) -> int:
        r = self.rng
        ram = self.card.card_ram.size
        return r.choice(
            [
                r.randrange(0x1000, ram),  # somewhere in card RAM (card-owned garbage)
                self.scratch,
                0,  # the card's reserved page
                ram - 8,  # straddles the end of card RAM
                ram + r.randrange(1 << 20),  # past card RAM: no window
                _SMPT_BASE + r.randrange(1 << 16),  # host RAM: device page, vrings
                _SMPT_BASE + (1 << 36),  # an SMPT slot never opened
                r.randrange(2**64),
                2**64 - 16,
            ]
        )

    def length(self) -> int:
        r = self.rng
        return r.choice([0, 1, 16, 512, r.randrange(self.max_len), self.max_len, 2**32 - 1])

    def random_desc(self, i: int) -> None:
        r = self.rng
        flags = r.choice([0, _NEXT, _WRITE, _NEXT | _WRITE, _INDIRECT, r.randrange(1 << 16)])
        nxt = r.choice([r.randrange(self.size), i, self.size, r.randrange(1 << 16)])
        self.write_desc(i, self.addr(), self.length(), flags, nxt)

    # -- the attacks: one hostile write, then a kick ---------------------------------------
    def descriptors(self) -> None:
        """1-4 random descriptors and one avail entry naming one of them."""
        heads = [self.rng.randrange(self.size) for _ in range(self.rng.randint(1, 4))]
        for i in heads:
            self.random_desc(i)
        self.publish(self.rng.choice(heads))
        self.kick()

    def avail(self) -> None:
        """Random heads in the avail ring; idx moved by their count or by a random jump."""
        r = self.rng
        heads = [r.choice([r.randrange(self.size), r.randrange(1 << 16)]) for _ in range(8)]
        jump = r.choice([None, None, 0, self.size, self.size + 1, r.randrange(1 << 16)])
        self.publish(*heads[: r.randint(1, 8)], jump=jump)
        self.kick()

    def loop(self) -> None:
        """A chain whose NEXT links come back to its head (a 1-, 2- or n-cycle)."""
        r = self.rng
        n = r.choice([1, 2, min(self.size, r.randint(3, 64))])
        start = r.randrange(self.size)
        chain = [(start + k) % self.size for k in range(n)]
        for k, i in enumerate(chain):
            self.write_desc(i, r.randrange(0x1000, 0x2000), 16, _NEXT, chain[(k + 1) % n])
        self.publish(start)
        self.kick()

    def indirect(self) -> None:
        """An INDIRECT descriptor over a garbage, misaligned, nested or looping table."""
        r = self.rng
        table = self.mem.view(self.scratch, 4096, True)
        kind = r.randrange(5)
        n = r.randint(1, 64)
        if kind == 0:
            table[:] = r.randbytes(4096)
        else:
            for k in range(n):
                flags = {1: _INDIRECT, 2: _NEXT, 3: _NEXT | _WRITE, 4: _NEXT}[kind]
                nxt = {2: k, 4: r.randrange(1 << 16)}.get(kind, k + 1)
                _DESC.pack_into(table, 16 * k, self.addr(), self.length(), flags, nxt)
        length = r.choice([16 * n, 16 * n + 3, 0, 2**32 - 16, 16 * 4096])
        head = r.randrange(self.size)
        flags = r.choice([_INDIRECT, _INDIRECT | _NEXT, _INDIRECT | _WRITE])
        self.write_desc(head, r.choice([self.scratch, self.addr()]), length, flags, head)
        self.publish(head)
        self.kick()

    def out_of_window(self) -> None:
        """A well-formed one-buffer chain whose address lies outside any window."""
        r = self.rng
        head = r.randrange(self.size)
        addr = r.choice(
            [self.card.card_ram.size, _SMPT_BASE + (1 << 30), _SMPT_BASE, 2**63, 2**64 - 512]
        )
        self.write_desc(head, addr, r.choice([16, 512, 4096]), r.choice([0, _WRITE]), 0)
        self.publish(head)
        self.kick()

    def move_used(self) -> None:
        """After DRIVER_OK, point a used ring somewhere else and ask the host to follow."""
        r = self.rng
        view = self.dev.view
        target = r.choice(
            [
                self.card.bus.platform.dp_address,  # the device page (host RAM)
                self.layout.desc,  # on top of the descriptor table
                self.scratch,  # card RAM: legal, but not what the driver uses
                self.card.card_ram.size - 4,
                r.randrange(2**64),
            ]
        )
        view.set_vq_used_address(self.qi, target)
        view.set_ctrl(Ctrl.USED_ADDRESS_UPDATED, 1)
        self.kick()

    def entry(self) -> None:
        """Garbage in the card-writable bytes of the device's entry: status (host_ack
        cleared), feature acks, or one control byte."""
        r = self.rng
        view = self.dev.view
        kind = r.randrange(3)
        if kind == 0:
            view.set_ctrl(Ctrl.HOST_ACK, 0)
            view.status = r.randrange(256)
        elif kind == 1:
            view.guest_acks = r.randrange(2**64)
        else:
            field = r.choice([c for c in Ctrl if c is not Ctrl.VDEV])
            view.set_ctrl(field, r.randrange(256) - (128 if field >= Ctrl.C2H_VDEV_DB else 0))
        self.kick()

    def doorbells(self) -> None:
        """A doorbell flood: every card->host doorbell, many times."""
        ring = self.card.bus.platform.ring_host
        for _ in range(self.rng.choice([16, 256])):
            for db in range(C2H_DOORBELLS):
                ring(db)


ATTACKS: dict[str, Callable[[_Target], None]] = {
    "descriptors": _Target.descriptors,
    "avail": _Target.avail,
    "loop": _Target.loop,
    "indirect": _Target.indirect,
    "out_of_window": _Target.out_of_window,
    "move_used": _Target.move_used,
    "entry": _Target.entry,
    "doorbells": _Target.doorbells,
}


async def _settle(target: _Target, limit: float) -> bool:
    """Wait until the host has looked at the avail ring (its ``_mic_vring_info.avail_idx``
    caught up) or marked the device NEEDS_RESET; False after ``limit`` seconds.

    This paces the rounds so that the host really looks at (nearly) each one,
    instead of seeing only the last of a burst."""
    info = target.layout.desc + vring_info_offset(target.size)
    info += field_offset(MicVringInfo, "avail_idx")
    want = int.from_bytes(target.mem.view(target.layout.avail + 2, 2), "little")
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status = target.dev.status
        if status & NEEDS_RESET or not status & DRIVER_OK:
            return True  # broken, or not being served: nothing more will happen
        if int.from_bytes(target.mem.view(info, 2), "little") == want:
            return True
        await asyncio.sleep(0.001)
    return False


async def campaign(
    card: Any,
    seed: int,
    rounds: int,
    devices: list[str],
    attacks: list[str] | None = None,
    episode: int = 20,
    reset_timeout: float = 3.0,
) -> dict[str, Any]:
    """Play ``rounds`` hostile rounds from ``seed`` on ``devices`` of this card.

    Stops early (``needs_card_reset``) when a device cannot be reset and
    re-probed any more; the caller then resets the card and goes on with a new
    seed. Returns counters: rounds, episodes, resets, what the host did.
    """
    rng = random.Random(seed)
    names = attacks or sorted(ATTACKS)
    counts: Counter[str] = Counter()
    out: dict[str, Any] = {"rounds": 0, "episodes": 0, "resets": 0, "needs_reset_seen": 0}
    out |= {"unsettled": 0, "needs_card_reset": None}
    scratch = card.alloc(4096, 4096)
    try:
        while out["rounds"] < rounds:
            name = rng.choice(devices)
            try:
                target = _Target(card, name, rng, scratch)
            except (MicError, IndexError, AttributeError) as e:
                out["needs_card_reset"] = f"{name}: not usable: {e!r}"[:300]
                break
            out["episodes"] += 1
            for _ in range(min(rng.randint(1, episode), rounds - out["rounds"])):
                attack = rng.choice(names)
                try:
                    ATTACKS[attack](target)
                except MicError as e:  # our own write refused by the card's windows
                    counts[f"{attack}:refused:{type(e).__name__}"] += 1
                counts[attack] += 1
                out["rounds"] += 1
                if not await _settle(target, 0.01):
                    out["unsettled"] += 1
                await asyncio.sleep(0)  # heartbeats and the link keep going
            out["needs_reset_seen"] += bool(target.dev.status & NEEDS_RESET)
            target.repair()
            try:
                async with asyncio.timeout(reset_timeout):
                    new = await card.bus.reset_device(name)
            except (MicError, TimeoutError) as e:
                out["needs_card_reset"] = f"{name}: reset failed: {e!r}"[:300]
                break
            if new is None or new.state != "live":
                out["needs_card_reset"] = f"{name}: re-probe failed"
                break
            out["resets"] += 1
    finally:
        card.free(scratch)
    out["attacks"] = dict(sorted(counts.items()))
    return out


async def giant_console_chain(card: Any, buffers: int, size: int) -> dict[str, Any]:
    """One valid transmit chain on the console's port-0 transmit queue: ``buffers``
    descriptors of ``size`` bytes each, all inside this card's RAM (issue 14 item 1).
    The host must bound what it copies; returns what was posted.
    """
    dev = card.bus.device("hvc0")
    ep = dev.endpoints[1]  # virtio-console: queue 0 receive, queue 1 transmit (port 0)
    layout = ep.queue.layout
    ram = card.card_ram.size
    size = min(size, ram - 0x10000)
    table = card.alloc(16 * buffers, 16)
    try:
        mem = card.memory
        view = mem.view(table, 16 * buffers, True)
        for k in range(buffers):
            flags = _NEXT if k + 1 < buffers else 0
            _DESC.pack_into(view, 16 * k, 0x10000, size, flags, k + 1)
        head = 0
        _DESC.pack_into(mem.view(layout.desc, 16, True), 0, table, 16 * buffers, _INDIRECT, 0)
        idx_view = mem.view(layout.avail + 2, 2, True)
        idx = int.from_bytes(idx_view, "little")
        slot = layout.avail + 4 + 2 * (idx % layout.size)
        mem.view(slot, 2, True)[:] = head.to_bytes(2, "little")
        idx_view[:] = ((idx + 1) & 0xFFFF).to_bytes(2, "little")
        dev._notify_host()
        await asyncio.sleep(0.5)
    finally:
        card.free(table)
    return {"buffers": buffers, "size": size, "total": buffers * size}


# -- the healthy neighbour ----------------------------------------------------------------


async def verified_io(
    card: Any, dev: str, seed: int, ops: int, seconds: float, sectors: int = 8
) -> dict[str, Any]:
    """Write a seeded pattern at a random place of ``dev``, read it back and compare,
    until ``ops`` writes+reads were done or ``seconds`` passed (whichever first;
    0 means no bound). Returns counts, mismatches and every operation's latency (ms).
    """
    rng = random.Random(seed)
    blk = card.device(dev)
    span = int(blk.capacity) - sectors
    lat: list[float] = []
    errors: list[str] = []
    done = 0
    stop = time.monotonic() + seconds if seconds else float("inf")
    while (not ops or done < ops) and time.monotonic() < stop:
        sector = rng.randrange(span)
        data = rng.randbytes(sectors * SECTOR)
        try:
            t0 = time.perf_counter()
            await blk.write(sector, data)
            t1 = time.perf_counter()
            back = bytes(await blk.read(sector, sectors))
            t2 = time.perf_counter()
        except MicError as e:
            errors.append(f"op {done}: {e!r}"[:200])
            if len(errors) > 20:
                break
            continue
        lat += [(t1 - t0) * 1e3, (t2 - t1) * 1e3]
        if back != data:
            errors.append(f"op {done}: sector {sector} read back differs")
        done += 1
    return {"ops": done, "errors": errors, "latency_ms": [round(x, 4) for x in lat]}


# -- attacks on the control link ------------------------------------------------------------


async def link_nested(card: Any, depth: int) -> int:
    """One well-framed link message nested ``depth`` deep (``[[[[...``; issue 14 item 2).
    The host must drop this card's link (it is marked crashed) and nothing else."""
    body = b"[" * depth + b"]" * depth
    sock = card._os.pcie.link._fs.sock
    data = struct.pack(">I", len(body)) + body
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await asyncio.sleep(0.001)
    return len(data)


async def link_spam(card: Any, path: str, seconds: float, seed: int = 0) -> dict[str, int]:
    """Connect to another card's link socket ``path`` over and over for ``seconds``:
    close at once, or send half a hello and close, or send half a hello and keep
    the connection open until the end (issue 14 item 5)."""
    import socket

    rng = random.Random(seed)
    out = {"connections": 0, "refused": 0, "held": 0}
    held: list[socket.socket] = []
    stop = time.monotonic() + seconds
    loop = asyncio.get_running_loop()
    try:
        while time.monotonic() < stop:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            keep = False
            try:
                await loop.sock_connect(s, path)
                out["connections"] += 1
                kind = rng.random()
                if kind < 0.5:
                    s.send(struct.pack(">I", 64) + b'{"type":"hel')
                keep = kind < 0.05 and len(held) < 32
            except OSError:
                out["refused"] += 1
                await asyncio.sleep(0.01)
            finally:
                if keep:
                    held.append(s)
                    out["held"] += 1
                else:
                    s.close()
            await asyncio.sleep(0)
    finally:
        for s in held:
            s.close()
    return out
