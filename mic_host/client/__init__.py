"""The client library of the mic-host daemon: what scripts, tests and ``micctl`` use.

Never imports the daemon side (card manager, VOP, backends, endpoint, control
server, daemon); only the shared bottom of ``mic_host`` (``paths``, ``config``
to check launch config text, ``lifecycle`` for state names, the control
socket's codec ``control.wire``), ``virtio`` and, for offload channels,
``transport``. Its modules, lowest first:

- :mod:`~mic_host.client.apps`: card apps from the caller's project (finding them,
  collecting the code to send), :class:`AppError`;
- :mod:`~mic_host.client.console`: console pty streams and exec results;
- :mod:`~mic_host.client.terminal`: relaying this terminal to a console (``micctl console``);
- :mod:`~mic_host.client.accel`: accelerator offload channels to a card;
- :mod:`~mic_host.client.events`: event and log streams (``client.events()``, ``card.logs()``);
- :mod:`~mic_host.client.card`: :class:`CardClient`, one card's operations;
- :mod:`~mic_host.client.connection`: :class:`Client`, :func:`connect`;
- :mod:`~mic_host.client.launch`: :func:`launch`, a daemon as a child process;
- :mod:`~mic_host.client.pytest_plugin`: the ``mic_vop`` fixtures (not imported here).
"""

from mic_host.client.apps import AppCodeTooLarge, AppError
from mic_host.client.connection import CardClient, Client, connect, open_connection
from mic_host.client.console import ConsoleStream, ExecResult
from mic_host.client.events import EventStream, LogStream
from mic_host.client.launch import DEFAULT_DAEMON_MODULE, launch

__all__ = [
    "AppError",
    "AppCodeTooLarge",
    "CardClient",
    "Client",
    "connect",
    "open_connection",
    "launch",
    "DEFAULT_DAEMON_MODULE",
    "ConsoleStream",
    "ExecResult",
    "EventStream",
    "LogStream",
]
