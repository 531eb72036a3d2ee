#!/usr/bin/env python3
"""Mint securechat's local CA and server certificate: ``python scripts/gen_certs.py --help``.

Same as ``securechat gen-certs``, and works from a plain checkout without installing the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

# A plain checkout has no installed package: make the repository root importable, ahead of any
# other installed securechat so the script always matches the code next to it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from securechat.pki.gencerts import main

if __name__ == "__main__":
    sys.exit(main(prog="gen_certs.py"))
