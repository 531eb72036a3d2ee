"""The chat server: connections and handshakes, sessions, rooms, and the ``serve`` command line."""
