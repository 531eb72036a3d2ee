"""``python -m securechat``: the same as the ``securechat`` command."""

from securechat.cli import main

raise SystemExit(main())
