"""One card as the host daemon runs it: public operations, one boot session, link dispatch.

- :mod:`mic_host.card.manager`: :class:`CardManager`, the public operations
  (status, boot, shutdown, reset, run, hot plug, net, exec, console) and what
  outlives a boot (config, devices, ptys, the lifecycle table);
- :mod:`mic_host.card.session`: :class:`~mic_host.card.session.BootSession`,
  what lives for one boot (link server, ``PcieHost``, VOP, child process,
  watchers) and the one reason it ended;
- :mod:`mic_host.card.devices`: the device list that outlives boots (host
  names, console ptys and logs, one backend per entry at each boot);
- :mod:`mic_host.card.dispatch`: the host end of the control link (typed
  messages in, replies matched to requests);
- :mod:`mic_host.card.process`: starting and killing the ``mic-card`` process.

Imports point down in that order; nothing here imports the daemon.
"""

from __future__ import annotations

from mic_host.card.manager import CardManager

__all__ = ["CardManager"]
