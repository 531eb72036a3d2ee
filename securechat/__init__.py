"""securechat: real-time LAN chat, TLS by default, with its own certificate tooling."""

__version__ = "0.1.0"

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 5555
