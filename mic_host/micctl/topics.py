"""``micctl help TOPIC``: the essentials, shipped with the package (``docs/`` is not).

Each topic is a short text that stands on its own; ``docs/*.md`` in a source
checkout has the full reference. Keep them in step with the commands
(``tests/integration/test_cli_extras.py`` checks that each topic exists and
names what it should). Pure data; imports nothing from the project.
"""

from __future__ import annotations

__all__ = ["TOPICS"]

TOPICS: dict[str, tuple[str, str]] = {
    "config": (
        "the daemon's TOML config: cards and their devices",
        """\
mic-host runs the cards of its config: `mic-host --config FILE`, or the
embedded default (card mic0, booted at start, with a console and a 64 MiB disk
in the state directory). Start from the default:

  mic-host --print-default-config > mic.toml
  mic-host --check-config mic.toml       # validates, prints a summary, starts nothing
  mic-host --config mic.toml

  version = 1
  [[cards]]
  name = "mic0"                 # ^mic[0-9]+$, unique
  boot_at_start = true          # default false
  card_ram = "64M"              # sizes: bytes or K/M/G/T (powers of 1024)
  host_ram = "16M"
  heartbeat_interval = 1.0      # seconds; heartbeat_timeout (5.0) must exceed it
  boot_timeout = 30.0           # booting -> online, else reset_failed
  shutdown_timeout = 10.0
  [[cards.devices]]             # in device-page order; see 'micctl help devices'
  type = "block"
  name = "disk"                 # optional label, unique per card
  options = { image = "{state_dir}/{card}.img", size = "64M", create = true }

Unknown keys and out-of-range values are errors naming the file and key.
{state_dir} and {card} are expanded in paths; relative paths are taken from
the config file's directory.

State directory (daemon, micctl and the client library agree on it):
--state-dir DIR, else $MIC_STATE_DIR, else ~/.local/state/mic-vop
($XDG_STATE_HOME/mic-vop). It holds control.sock, logs and default images.
""",
    ),
    "devices": (
        "virtio devices: block, console, net; hot attach and detach",
        """\
Each card has virtio devices, named on the card as Linux does: block vda,
vdb, ...; consoles hvc0, ...; NICs eth0, ... (`micctl status` lists them).

  block    options: image (required path), size, create, read_only, serial
           (<= 20 bytes), num_queues (1..4), queue_size (4..256, power of 2),
           blk_size (512..64K), discard (default true); or backend "vhost-user"
           with socket (an external back-end such as qemu-storage-daemon serves
           the card's rings) and queue_size (default 128)
  console  a pty on the host (`micctl console CARD`), the card shell on port 0,
           the agent on a named port (`micctl exec`)
  net      backend "tap" (a host TAP, needs root) or "switch" (userspace);
           mac, mtu, host_ip, card_ip, netns, card_netns, card_mode, switch
           `micctl net CARD [DEVICE] [--link up|down]` shows and sets them

Hot-plug on a running card:

  micctl attach mic0 block --image /tmp/x.img --size 16M --create   # prints vdb
  micctl attach mic0 net --opt backend=switch
  micctl detach mic0 vdb          # the card name or the label
  micctl stats mic0               # per-queue counters

Other types come from backend plug-ins registered by name.
""",
    ),
    "apps": (
        "card apps: your async Python running inside the card OS",
        """\
A card app is `async def main(card, *args)` in an importable module; it runs
inside the card OS process, with the card's drivers:

  # mymod.py
  async def main(card):
      vda = card.device("vda")                   # the virtio-blk driver
      await vda.write(0, b"hello".ljust(512, b"\\0"))
      await vda.flush()
      return bytes(await vda.read(0, 1))[:5]     # JSON-able; bytes come back as hex

  micctl run mic0 mymod:main [ARGS...]

mymod must be importable by the card OS process. From Python:
`await client.card("mic0").run("mymod:main")`.
""",
    ),
    "exec": (
        "run card-shell commands through the agent, with stdin",
        """\
  micctl exec CARD [--timeout S] [-i|-n] [--] CMD [ARGS...]
  micctl exec CARD [--timeout S] [-i|-n] --shell LINE

The command runs in the card shell (see `micctl exec mic0 -- help` for its
commands); its stdout and stderr become micctl's and micctl exits with its
status: 124 timed out (--timeout, default 30 s), 127 unknown command, 1 if
it could not run at all (card down, no agent).

--shell LINE takes a command line: quotes, # comments, < > >> redirection,
pipes (a | b), lists (a; b, a && b, a || b). No variables, globs or '&'.

  micctl exec mic0 -- sha256sum /dev/vda
  micctl exec mic0 --shell 'dd if=/dev/vda bs=4k count=1 | sha256sum > /tmp/h'
  echo hi | micctl exec mic0 -- cat
  micctl exec mic0 -- sha256sum < local.bin

stdin is sent when it is not a terminal (read whole, at most 512 KiB);
-i/--stdin sends a terminal's input too (end it with Ctrl-D), -n/--no-stdin
never reads stdin. Output is kept up to 256 KiB per stream.
""",
    ),
    "console": (
        "the card's console: the shell on a pty",
        """\
  micctl console CARD [--device NAME]       # Ctrl-] detaches
  micctl console CARD --print-path          # the pty, for screen/minicom

Attaches this terminal (raw mode; window size follows) to the card console,
where the card shell runs: prompt `mic0:~# `, line editing, Ctrl-C stops
the running command, `exit` starts a new session, `reboot`/`poweroff` end
the card OS. Output nobody read is in STATE_DIR/CARD-console.log. Exit 0
after detaching, 1 if the console went away.
""",
    ),
    "images": (
        "block images: create, copy, preallocate, read-only",
        """\
A block device is backed by an image file on the host (a regular file or a
block device; size a whole number of blk_size blocks, not empty).

  micctl attach mic0 block --image x.img --size 16M --create        # sparse
  micctl attach mic0 block --image x.img --size 4G --create --preallocate
  micctl attach mic0 block --image copy.img --copy-from golden.img [--size 8G]
  micctl attach mic0 block --image ro.img --read-only --serial DISK1

Created images are 0600; relative paths are in the state directory. In a
config: options = { image = "{state_dir}/{card}.img", size = "64M",
create = true }. On the card the disk is /dev/vdX (`micctl exec mic0 --
dd if=/dev/vda bs=4k count=1 status=none`).
""",
    ),
}
