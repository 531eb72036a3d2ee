"""securechat: real-time LAN chat, TLS by default, with its own certificate tooling.

The package by role: ``wire`` (what both ends speak), ``pki`` (the local certificate authority),
``store`` (where room lines live), ``server`` and ``client``; ``cli`` is the face.
"""

from securechat.wire.addr import DEFAULT_HOST, DEFAULT_PORT

__version__ = "0.1.0"

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "__version__"]
