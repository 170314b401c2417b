"""The yardsticks of :mod:`bench.latency`: what one round trip costs with nothing of ours in it.

- :func:`floor`: two asyncio processes ping-pong over a pair of eventfds with
  ``loop.add_reader`` and no spinning: one host -> card -> host round trip
  with one wake-up on each side, the cost Python itself allows.
- :func:`pty_floor`: the console row's client (blocking reads on a pty's
  slave) against an asyncio process echoing on the master from its reader
  callback: what the kernel's pty adds (each direction goes through a
  kworker, ``tty_flip_buffer_push``), the console's lower bound.

Standard library only.
"""

from __future__ import annotations

import asyncio
import os
import time

__all__ = ["floor", "pty_floor"]


def _floor_child(efd_in: int, efd_out: int) -> None:
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_ready() -> None:
            v = os.eventfd_read(efd_in)
            if v >= 1 << 40:
                done.set_result(None)
                return
            os.eventfd_write(efd_out, 1)

        loop.add_reader(efd_in, on_ready)
        await done

    asyncio.run(serve())


def floor(n: int) -> list[int]:
    """``n`` eventfd + ``add_reader`` round trips between two asyncio processes."""
    a, b = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            _floor_child(a, b)
        finally:
            os._exit(0)

    async def drive() -> list[int]:
        loop = asyncio.get_running_loop()
        out: list[int] = []
        fut: asyncio.Future[None] | None = None

        def on_ready() -> None:
            os.eventfd_read(b)
            if fut is not None and not fut.done():
                fut.set_result(None)

        loop.add_reader(b, on_ready)
        clock = time.perf_counter_ns
        for i in range(n + n // 10):
            fut = loop.create_future()
            t0 = clock()
            os.eventfd_write(a, 1)
            await fut
            if i >= n // 10:
                out.append(clock() - t0)
        loop.remove_reader(b)
        return out

    try:
        return asyncio.run(drive())
    finally:
        os.eventfd_write(a, 1 << 41)
        os.waitpid(pid, 0)
        os.close(a)
        os.close(b)


def _pty_echo_child(master: int) -> None:
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_ready() -> None:
            data = os.read(master, 4096)
            if b"q" in data:
                done.set_result(None)
                return
            os.write(master, data)

        loop.add_reader(master, on_ready)
        await done

    asyncio.run(serve())


def pty_floor(n: int) -> list[int]:
    """``n`` one-byte echoes over a raw pty: this module's console client (blocking
    reads on the slave) against an asyncio process echoing on the master."""
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(slave)
            _pty_echo_child(master)
        finally:
            os._exit(0)
    os.close(master)
    clock = time.perf_counter_ns
    out: list[int] = []
    try:
        for i in range(n + n // 10):
            t0 = clock()
            os.write(slave, b"x")
            os.read(slave, 1)
            if i >= n // 10:
                out.append(clock() - t0)
    finally:
        os.write(slave, b"q")
        os.waitpid(pid, 0)
        os.close(slave)
    return out
