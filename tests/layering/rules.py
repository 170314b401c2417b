"""THE DECLARED LAYERS of MIC-VOP: the one place that says who may import whom.

Read by :mod:`tests.layering.test_tree`, which checks the real tree against
it (every import counted: top level, in functions, under ``if TYPE_CHECKING:``,
relative, ``importlib.import_module("literal")``). Adjust it here, and only
here, when the architecture changes; docs/architecture.md describes the
same shape in prose.

How to read the layer table
---------------------------
For each package, its layers LOWEST FIRST. A layer is a tuple of module
patterns relative to the package: ``"vop"`` matches ``mic_host.vop`` and every
``mic_host.vop.*`` (so a module that becomes a package keeps its place),
``"__init__"`` matches the package's own ``__init__``, fnmatch wildcards are
allowed (``"handshake*"``). A module belongs to the layer of its most specific
matching pattern (``"accel.commands"`` beats ``"accel"``), and may import
modules of its own layer or of lower layers, never of a higher one. Inside a
layer any direction is allowed, but no cycle (no cycle anywhere, in fact).
A new module that matches no pattern fails the test until it is placed here.
"""

from __future__ import annotations

from tests.layering.checker import Barrier, Rules

__all__ = ["PACKAGES", "LAYERS", "VIRTIO_FORBIDDEN", "BARRIERS", "RULES"]

# ==========================================================================
# Between packages: each package and the other project packages it may import.
# virtio imports nothing above it; transport only virtio; mic_host and
# mic_card compose the two and never import each other.
PACKAGES: dict[str, frozenset[str]] = {
    "virtio": frozenset(),
    "transport": frozenset({"virtio"}),
    "mic_host": frozenset({"virtio", "transport"}),
    "mic_card": frozenset({"virtio", "transport"}),
}

# What the sans-IO core must never import (directly): an event loop, the OS,
# sockets, memory maps, processes, signals, terminals, a clock (time is a
# parameter of the core, STYLE.md §1). ``threading`` stays allowed: the ring
# core's memory fence is a lock.
VIRTIO_FORBIDDEN: frozenset[str] = frozenset(
    {
        "asyncio",
        "anyio",
        "trio",
        "aiofiles",
        "selectors",
        "select",
        "socket",
        "socketserver",
        "ssl",
        "mmap",
        "os",
        "posix",
        "io",
        "shutil",
        "tempfile",
        "pathlib",
        "fcntl",
        "termios",
        "tty",
        "pty",
        "signal",
        "subprocess",
        "multiprocessing",
        "concurrent",
        "ctypes",
        "time",
        "datetime",
    }
)

# ==========================================================================
# Inside each package: THE DECLARED LAYERS, lowest first.
LAYERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "virtio": (
        # the leaves every layer of the project uses (ratelimit: what a peer
        # can make us log is bounded; the clock is a parameter)
        ("errors", "constants", "ratelimit", "trace"),
        # the memory protocol and the byte layouts (construct declarations)
        ("memory", "memory_protocol", "layouts"),
        # the ring cores (split: layout, chain, device side, driver side, faults, fence)
        ("split",),
        # the packed ring core (driver side, device side, layout; reuses
        # split's faults, fence and chain)
        ("packed",),
        # the device page: live entry accessors, status negotiation, the
        # handshakes (status/host_ack, config change/guest_ack, used-ring move,
        # vdev reset, hot remove) as host and card halves
        ("devpage", "status", "handshake*"),
        # one module per protocol both sides speak
        ("net", "blk", "console", "agent", "accel"),
        ("__init__",),
    ),
    "transport": (
        ("errors",),
        # polls at the idle priority: the C guard thread and its Python face
        ("_pollguard", "pollguard"),
        # regions, doorbells/interrupts, the typed control-link messages, tap
        ("region", "notify", "messages", "tap", "appcode", "tracing", "spinloop"),
        # which loop mic-host and mic-card run on (spin, asyncio, uvloop)
        ("eventloop",),
        # MMIO registers, the framed control link and its boot handshake, the DMA engine
        ("mmio", "link", "dma", "handshake"),
        # address spaces through windows (aperture, SMPT, IOMMU)
        ("space",),
        # the host and card ends of a PCIe connection
        ("pcie",),
        # vhost-user: the sans-IO codec, the mapped memory table, the socket with fds
        ("vhost_user",),
        ("__init__",),
    ),
    "mic_host": (
        # vocabulary both the daemon and the client use (events: the event
        # values and the bounded feeds both sides fill)
        ("paths", "lifecycle", "version", "events"),
        # configuration, the control-socket wire codec (no I/O)
        ("config", "control"),
        # daemon side, bottom up: queue endpoint and card-agent client ...
        ("endpoint", "agent"),
        # ... device backends (block, console, net) ...
        ("backends",),
        # ... the vhost-user back-end serving one backend to QEMU (mic-vhost-user) ...
        ("vhost_user",),
        # ... VOP: device page, devices, the set of devices ...
        ("vop",),
        # ... card manager: public operations, one boot session, link dispatch ...
        ("card",),
        # ... the daemon and its control-socket server
        ("daemon", "control.server", "host_cli", "hostlog", "streams"),
        # client side (never imports the daemon side, see BARRIERS): the client
        # subpackage (connection, console streams, offload sessions, launch,
        # pytest plugin)
        ("client",),
        # a thin CLI over the client
        ("micctl",),
        ("__init__", "__main__"),
    ),
    "mic_card": (
        # what card code may use of the card OS (CardServices), the queue endpoint
        ("services", "endpoint"),
        # the card bus: reads the device page, probes the drivers it is given
        ("bus",),
        # the parts of the net driver (shared state and pools, receive half,
        # transmit half, boot parameters, TAP setup), below the class that
        # composes them
        ("drivers.net_*",),
        # virtio drivers: blk, console, net; the driver table's loader
        # (built-ins + mic_vop.drivers entry points: drivers.plugins)
        ("drivers",),
        # the accelerator framework (loaded lazily)
        ("accel",),
        # the offload endpoint host scripts connect to
        ("offload",),
        # the shell: registry, file system, commands (also the accel command
        # module, which registers into the shell), line editor
        ("shell", "accel.commands"),
        # the agent serving the host (runs shell commands)
        ("agent",),
        # card apps: loading the caller's code fresh per run, the running-app registry
        ("apps",),
        # the card OS: the composition root, which nothing below imports
        ("card",),
        ("main", "__main__", "__init__"),
    ),
}

# Walls inside one package that the order of layers alone does not express.
BARRIERS: tuple[Barrier, ...] = (
    Barrier(
        "mic_host",
        importers=("client", "micctl"),
        imported=(
            "endpoint",
            "agent",
            "backends",
            "vop",
            "card",
            "daemon",
            "control.server",
            "hostlog",
            "streams",
        ),
        reason="the client library and micctl never import the daemon side",
    ),
    Barrier(
        "mic_card",
        importers=("accel.*",),
        imported=("accel.framework",),
        reason="accelerator children depend on the owner protocols (accel.owner, "
        "accel.api), never on the framework that implements them",
    ),
    Barrier(
        "mic_card",
        importers=("accel",),
        imported=("bus",),
        reason="accelerators get card RAM through CardServices, not from the virtio bus",
    ),
    Barrier(
        "mic_card",
        importers=("accel.commands",),
        imported=(
            "offload",
            "shell.base",
            "shell.core",
            "shell.files",
            "shell.fs",
            "shell.net",
            "shell.interactive",
        ),
        reason="the accel shell command registers into the shell's registry and "
        "needs nothing else of the shell or of the offload endpoint",
    ),
)
# ==========================================================================

RULES = Rules(
    packages=PACKAGES,
    layers=LAYERS,
    forbidden_outside={"virtio": VIRTIO_FORBIDDEN},
    barriers=BARRIERS,
)
