"""mic_host: the host side of MIC-VOP (daemon, VOP layer, backends, micctl, client).

The client library (:mod:`mic_host.client`) is the public face for scripts;
importing ``mic_host`` loads it and nothing of the daemon side::

    async with mic_host.launch(state_dir="/tmp/mic") as client:
        card = client.card("mic0")
        await card.wait("online")
"""

from mic_host.client import CardClient, Client, connect, launch

__all__ = ["CardClient", "Client", "connect", "launch"]
