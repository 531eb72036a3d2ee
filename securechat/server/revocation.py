"""Ending live sessions the CA's ledger no longer allows: the chat side of revocation.

The server's :class:`~securechat.server.trust.Trust` knows what the ledger says; this watcher re-reads it
every :data:`~securechat.pki.ledger.REVOCATION_POLL` seconds (publishing it to the cluster, on the server
that does) and closes the sessions of revoked certificates and names, and those of guests whose nick was
given to a certificate holder meanwhile, so ``securechat revoke`` ends a live session within a poll or
two, on every server of a cluster.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from securechat.pki.ledger import REVOCATION_POLL
from securechat.server.session import Session
from securechat.server.trust import Trust
from securechat.wire import protocol

log = logging.getLogger("securechat.enroll")


class RevocationWatcher:
    """A thread that ends the sessions the ledger no longer allows; :meth:`stop` ends it."""

    def __init__(self, trust: Trust, sessions: Callable[[], Iterable[Session]]) -> None:
        self.trust = trust
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
            try:
                self.check()
            except Exception:  # a bug here must not end revocation for the rest of the run
                log.exception("checking live sessions against the ledger failed")

    def check(self) -> None:
        """Re-read the ledger and end every session it no longer allows (one pass)."""
        self.trust.refresh()
        for session in self.sessions():
            if session.conn.closing:
                continue
            why = self.trust.refusal(session)
            if why is not None:
                log.warning("ending %s's session: %s", session.nick or "?", why)
                session.quitting = True  # put out, not dropped: no nick to hold for a resume
                session.conn.close(protocol.notice(f"{why}; goodbye"), reason=_reason(why))


def _reason(why: str) -> str:
    """What the others are told (``* alice left (certificate revoked)``)."""
    return "certificate revoked" if why.startswith(protocol.CERT_REVOKED) else "nickname taken by its holder"
