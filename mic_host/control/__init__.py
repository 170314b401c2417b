"""The control socket between the mic-host daemon and its clients (``micctl``, scripts).

Two modules, one direction:

- :mod:`mic_host.control.wire`: the codec (op table, requests, responses,
  encode/decode; no I/O). The client library imports only this.
- :mod:`mic_host.control.server`: the asyncio server the daemon runs
  (:class:`~mic_host.control.server.ControlServer`, the
  :class:`~mic_host.control.server.ControlHandler` seam); it imports the codec.

This ``__init__`` re-exports the codec only (``wire.__all__``), so importing
the package (as the client does) never loads the server.
"""

from mic_host.control import wire
from mic_host.control.wire import *  # noqa: F403

__all__ = [*wire.__all__]
