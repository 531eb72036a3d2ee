"""Ending live sessions whose client certificate was revoked: the chat side of the CA's denylist.

The authority (:mod:`securechat.pki.authority`) knows which serials are revoked; this watcher re-reads
that every :data:`~securechat.pki.ledger.REVOCATION_POLL` seconds and closes the matching sessions, so
``securechat revoke`` ends a live session within a poll or two.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from securechat.pki.authority import Authority
from securechat.pki.ledger import REVOCATION_POLL, serial_hex
from securechat.server.session import Session
from securechat.wire import protocol

log = logging.getLogger("securechat.enroll")


class RevocationWatcher:
    """A thread that ends the sessions of revoked certificates; :meth:`stop` ends it."""

    def __init__(self, authority: Authority, sessions: Callable[[], Iterable[Session]]) -> None:
        self.authority = authority
        self.sessions = sessions
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="securechat-revocations", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)

    def _watch(self) -> None:
        while not self._stop.wait(REVOCATION_POLL):
            self.authority.refresh()
            for session in self.sessions():
                serial = session.cert_serial
                if serial is not None and self.authority.is_revoked(serial) and not session.conn.closing:
                    log.warning("ending %s's session: certificate %s revoked", session.nick or "?", serial_hex(serial))
                    session.quitting = True  # put out, not dropped: no nick to hold for a resume
                    session.conn.close(protocol.notice(f"{protocol.CERT_REVOKED}; goodbye"),
                                       reason="certificate revoked")
