"""The mic-host daemon's configuration: a TOML file, parsed into frozen values.

Modules, lowest first: :mod:`~mic_host.config.sizes` (``"64M"`` <->
bytes), :mod:`~mic_host.config.files` (what a block image may be),
:mod:`~mic_host.config.limits` (the bounds, and whether a card's devices fit
its device page and host RAM, with VOP's arithmetic from ``virtio``),
:mod:`~mic_host.config.options` (device options and their checks, also used
for hot-attach) and :mod:`~mic_host.config.schema` (the value classes, the
file's parsing, the embedded default). The state directory's paths live in
:mod:`mic_host.paths`. Imports ``tomllib``, ``virtio`` and (for the
card-physical map, in ``limits`` only) ``transport.space``; no asyncio.
``limits`` is imported when a device or card is checked, not with the
package, so ``micctl`` starts without ``construct``. The daemon, ``micctl``
and the client library read their defaults from here so they agree.

Schema (also in ``docs/cli.md``)::

    version = 1                      # optional; only 1 exists

    [[cards]]                        # one table per card, at least one
    name = "mic0"                    # required, ^mic[0-9]+$, unique
    boot_at_start = true             # boot when the daemon starts (default false)
    card_ram = "64M"                 # card RAM (aperture) size, default 64M
    host_ram = "16M"                 # host RAM window (device page + vrings), default 16M
    heartbeat_interval = 1.0         # seconds between card heartbeats
    heartbeat_timeout = 5.0          # seconds without one before the card is "crashed"
    boot_timeout = 30.0              # booting -> online bound, else "reset_failed"
    shutdown_timeout = 10.0          # shutting_down -> ready bound before a forced reset
    used_ring_in_card = true         # let the card move used rings into card RAM
    card_command = ["strace", "-f"]  # optional: wrap the card OS (a debugger, a tracer...);
                                     # the daemon appends: python -m mic_card --link-fd N --card C

    [[cards.devices]]                # zero or more, in device-page order
    type = "block"                   # "block", "console", "net" or a registered backend
    name = "root"                    # optional label, unique per card
    options = { image = "{state_dir}/mic0.img", size = "64M", create = true }

Sizes are byte counts or strings with a binary suffix (``K``, ``M``, ``G``,
``T``, optionally followed by ``iB`` or ``B``): ``65536``, ``"64K"``,
``"1GiB"``. RAM sizes must be positive multiples of 4096 within the bounds of
:mod:`~mic_host.config.limits` (card RAM below the host RAM window, host RAM
holding the device page and the devices' rings), and the devices must fit
the 4 KiB device page. Durations are positive numbers of seconds, and
``heartbeat_timeout`` must exceed ``heartbeat_interval``.

Device options are checked for the built-in types (see :data:`DEVICE_OPTIONS`);
options of other (plug-in) types pass through untouched for their backend to
check. Every type takes the transport option ``ring = "split" | "packed"``
(:data:`~mic_host.config.options.TRANSPORT_OPTIONS`): the virtqueue layout VOP
offers; the daemon takes it out before the backend sees the options. In
string options of kind ``path``/``str`` the placeholders
``{state_dir}`` and ``{card}`` are expanded at load time, and relative paths
are resolved against the config file's directory (the state directory for the
embedded default).
"""

from mic_host.config.options import DEVICE_OPTIONS, OptionSpec, validate_device_options
from mic_host.config.schema import (
    CARD_NAME_RE,
    DEFAULT_CONFIG_TOML,
    CardConfig,
    DaemonConfig,
    DeviceConfig,
    check_card_devices,
    check_device_types,
    default_config,
    load_config,
    parse_config,
)
from mic_host.config.sizes import format_size, parse_size

__all__ = [
    "CardConfig",
    "DaemonConfig",
    "DeviceConfig",
    "OptionSpec",
    "DEVICE_OPTIONS",
    "DEFAULT_CONFIG_TOML",
    "CARD_NAME_RE",
    "load_config",
    "parse_config",
    "default_config",
    "parse_size",
    "format_size",
    "validate_device_options",
    "check_device_types",
    "check_card_devices",
]
