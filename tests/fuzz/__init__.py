"""Fuzz targets (hypothesis) for every decoder a peer can feed: the control link's
frame bodies and typed messages (:mod:`transport.link`, :mod:`transport.messages`),
the control socket's request and response lines (:mod:`mic_host.control.wire`)
and the link framing over a real socket pair.

The invariant everywhere: a decoder returns a value or raises
:class:`virtio.errors.RemoteProtocolError` (or, for a socket, ``LinkLost``);
never anything else. Every test fixes ``max_examples``, ``deadline=None`` and
``derandomize=True`` so a CI run is reproducible and takes a few seconds.
"""
