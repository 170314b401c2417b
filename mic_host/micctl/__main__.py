"""``python -m mic_host.micctl``: the same as the ``micctl`` script."""

import sys

from mic_host.micctl.main import main

sys.exit(main())
