"""``python -m mic_card``: the card OS process (see :mod:`mic_card.main`)."""

from mic_card.main import main

raise SystemExit(main())
