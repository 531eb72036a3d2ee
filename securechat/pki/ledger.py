"""The CA's ledger: invites, and the client certificates they led to (issued, renewed, revoked).

Everything lives in one SQLite file beside the CA (``certs/invites.db``, mode 0600, like ``ca.key``),
because two processes use it at once: ``securechat invite`` / ``revoke`` on the operator's terminal,
and the running server, which reads it on every enrollment and every half second for revocations.
SQLite's locking makes each step atomic across processes: claiming the last use of an invite is one
``UPDATE ... WHERE uses_left > 0`` inside ``BEGIN IMMEDIATE``, so two joiners racing with one code
get one certificate between them, never two.

Revocation is a serial denylist (the ``revoked_at`` column), checked by the server after each
handshake and every :data:`REVOCATION_POLL` seconds for live sessions. A CRL was rejected: Python's
``ssl`` fails every handshake when a configured CRL is missing or stale, and could not cut a session
that is already open anyway.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from securechat.pki.codes import NAMEPLATE_MAX, format_code, new_words

DB_NAME = "invites.db"

# The bound: an attacker who guesses online gets at most this many wrong tries per invite.
MAX_WRONG_TRIES = 3
# Long enough to phone someone and have them type it; short enough that a code on a sticky note dies.
DEFAULT_EXPIRES = 15 * 60.0
# A code is short; so is its life. A week covers "join when you're back on Monday".
MAX_EXPIRES = 7 * 24 * 3600.0
# A classroom; beyond that, a code read aloud is the wrong tool.
MAX_USES = 200
# Client certificates die on their own (a lost laptop's too) unless renewed: 30 days, renewed at 10 left.
DEFAULT_CERT_DAYS = 30
MAX_CERT_DAYS = 365
# Rows of finished invites are kept this long after expiry, so a late joiner hears "used"/"expired"
# rather than "no such invite", and their nameplates are not handed out again meanwhile.
KEEP_FINISHED = 7 * 24 * 3600.0
# SQLite waits this long for the other process's transaction (each one lasts milliseconds).
BUSY_TIMEOUT = 5.0
# How often the server re-reads the denylist: the issue asks for live sessions cut within 2 s.
REVOCATION_POLL = 0.5


class InviteError(Exception):
    """Why an invite cannot be used: one line, said to the joiner and logged by the server."""


class StoreError(Exception):
    """The store cannot be opened or written (a command-line failure: one line, exit 1)."""


@dataclass(frozen=True)
class Invite:
    """One invite as stored (the code itself is only shown once, at creation)."""

    nameplate: int
    name: str | None  # None: CA trust only, a guest picks a nickname
    created: float
    expires: float
    uses_total: int
    uses_left: int
    tries: int  # wrong (or in-flight) tries so far
    state: str  # active, used, cancelled, burned
    cert_days: int
    code: str


@dataclass(frozen=True)
class Issued:
    """A client certificate the CA issued (through an invite or a renewal)."""

    serial: str  # upper-case hex, as `securechat certs` shows it
    name: str
    not_after: float
    issued: float
    revoked: float | None
    last_seen: float | None
    cert_days: int


def serial_hex(serial: int) -> str:
    return f"{serial:X}"


def utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS invites (
    nameplate INTEGER PRIMARY KEY,
    code TEXT NOT NULL,
    name TEXT,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    uses_total INTEGER NOT NULL,
    uses_left INTEGER NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'active',
    cert_days INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS issued (
    serial TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    not_after REAL NOT NULL,
    issued REAL NOT NULL,
    revoked REAL,
    last_seen REAL,
    cert_days INTEGER NOT NULL,
    nameplate INTEGER
);
CREATE INDEX IF NOT EXISTS issued_name ON issued(name);
CREATE TABLE IF NOT EXISTS web_invites (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash BLOB NOT NULL UNIQUE,
    name TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'active',
    days INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS web_devices (
    serial TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL UNIQUE,
    invite INTEGER
);
"""


class Store:
    """The invite and certificate registry in ``certs_dir/invites.db``; safe across processes.

    Each method opens its own short transaction (and connection: the server calls it from several
    threads, and SQLite connections are not to be shared between them without care). ``clock``
    replaces ``time.time`` in tests.
    """

    def __init__(self, certs_dir: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(certs_dir)
        self.path = self.dir / DB_NAME
        self.clock = clock
        self._ready = False

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction. A writing one is IMMEDIATE: it takes the write lock before its first read,
        so check-then-update is atomic across threads and processes."""
        if not self._ready:
            self._create()
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from None
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot use {self.path}: {exc}") from None
        finally:
            db.close()

    _tx = transaction

    def _create(self) -> None:
        """Create the file 0600 before SQLite touches it (SQLite would use the umask: 0644)."""
        if not self.dir.is_dir():
            raise StoreError(f"no certificate directory {self.dir}: start 'securechat serve' once (it mints "
                             "the CA there), or pass --certs DIR")
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
            os.close(fd)
            mode = self.path.stat().st_mode & 0o777
            if mode & 0o077:
                os.chmod(self.path, 0o600)  # an old or copied file: the codes in it are secrets
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT)
            try:
                db.executescript(_SCHEMA)
            finally:
                db.close()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from None
        self._ready = True

    # -- invites ----------------------------------------------------------------------------

    def create(self, name: str | None, *, expires_in: float = DEFAULT_EXPIRES, uses: int = 1,
               cert_days: int = DEFAULT_CERT_DAYS) -> Invite:
        """A new invite with a fresh code and an unused nameplate."""
        now = self.clock()
        words = new_words()
        with self._tx() as db:
            db.execute("DELETE FROM invites WHERE expires < ?", (now - KEEP_FINISHED,))
            taken = {row[0] for row in db.execute("SELECT nameplate FROM invites")}
            free = [n for n in range(1, NAMEPLATE_MAX + 1) if n not in taken]
            if not free:
                raise StoreError(f"{NAMEPLATE_MAX} invites are alive: cancel some (securechat invite --list)")
            # The smallest free numbers first, so codes stay short; random among the first few.
            nameplate = secrets.choice(free[:9])
            code = format_code(nameplate, words)
            db.execute("INSERT INTO invites (nameplate, code, name, created, expires, uses_total, uses_left,"
                       " cert_days) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (nameplate, code, name, now, now + expires_in, uses, uses, cert_days))
        return Invite(nameplate, name, now, now + expires_in, uses, uses, 0, "active", cert_days, code)

    def invites(self, *, alive_only: bool = True) -> list[Invite]:
        now = self.clock()
        with self._tx(write=False) as db:
            rows = db.execute("SELECT nameplate, name, created, expires, uses_total, uses_left, tries, state, "
                              "cert_days, code FROM invites ORDER BY created").fetchall()
        found = [Invite(*row) for row in rows]
        return [i for i in found if i.state == "active" and i.expires > now] if alive_only else found

    def cancel(self, which: str) -> list[Invite]:
        """Cancel the live invites with that number or that name; return them."""
        now = self.clock()
        key = which.strip()
        with self._tx() as db:
            rows = db.execute("SELECT nameplate, name, created, expires, uses_total, uses_left, tries, state, "
                              "cert_days, code FROM invites WHERE state = 'active' AND expires > ? AND "
                              "(CAST(nameplate AS TEXT) = ? OR name = ?)", (now, key, key)).fetchall()
            for row in rows:
                db.execute("UPDATE invites SET state = 'cancelled' WHERE nameplate = ?", (row[0],))
        return [Invite(*row) for row in rows]

    def _usable(self, db: sqlite3.Connection, nameplate: int) -> Invite:
        row = db.execute("SELECT nameplate, name, created, expires, uses_total, uses_left, tries, state, "
                         "cert_days, code FROM invites WHERE nameplate = ?", (nameplate,)).fetchone()
        if row is None:
            raise InviteError(f"there is no invite number {nameplate} on this server: check the code (or ask "
                              "for a new one)")
        invite = Invite(*row)
        if invite.state == "used" or invite.uses_left <= 0:
            raise InviteError("this invite has already been used: ask for a new one")
        if invite.state == "cancelled":
            raise InviteError("this invite was cancelled: ask for a new one")
        if invite.state == "burned":
            raise InviteError(f"this invite was cancelled after {MAX_WRONG_TRIES} wrong codes: ask for a "
                              "new one")
        if invite.expires <= self.clock():
            raise InviteError(f"this invite expired at {utc(invite.expires)}: ask for a new one")
        return invite

    def lookup(self, nameplate: int) -> Invite:
        """The live invite with that number, or InviteError saying why it cannot be used."""
        with self._tx() as db:
            return self._usable(db, nameplate)

    def reserve_try(self, nameplate: int) -> Invite:
        """Count a try before its answer is checked (so concurrent guesses cannot exceed the bound)."""
        with self._tx() as db:
            invite = self._usable(db, nameplate)
            if invite.tries >= MAX_WRONG_TRIES:
                raise InviteError("too many attempts with this invite at once: try again in a minute")
            db.execute("UPDATE invites SET tries = tries + 1 WHERE nameplate = ?", (nameplate,))
        return invite

    def wrong_try(self, nameplate: int) -> int:
        """The reserved try was wrong: burn the invite at the bound. Returns the tries left."""
        with self._tx() as db:
            row = db.execute("SELECT tries FROM invites WHERE nameplate = ?", (nameplate,)).fetchone()
            tries = row[0] if row else MAX_WRONG_TRIES
            if tries >= MAX_WRONG_TRIES:
                db.execute("UPDATE invites SET state = 'burned' WHERE nameplate = ? AND state = 'active'",
                           (nameplate,))
        return max(0, MAX_WRONG_TRIES - tries)

    def release_try(self, nameplate: int) -> None:
        """The reserved try ended without an answer being checked (timeout, hang-up): give it back."""
        with self._tx() as db:
            db.execute("UPDATE invites SET tries = tries - 1 WHERE nameplate = ? AND tries > 0", (nameplate,))

    def claim(self, nameplate: int) -> Invite:
        """A right code: take one use, atomically, and give the reserved try back.

        Raises InviteError when another joiner took the last use in the meantime (the try is given
        back all the same: it was not a wrong one).
        """
        refusal: InviteError | None = None
        with self._tx() as db:
            db.execute("UPDATE invites SET tries = tries - 1 WHERE nameplate = ? AND tries > 0", (nameplate,))
            try:
                invite = self._usable(db, nameplate)
            except InviteError as exc:
                refusal = exc
            else:
                db.execute("UPDATE invites SET uses_left = uses_left - 1, state = CASE WHEN uses_left = 1 "
                           "THEN 'used' ELSE state END WHERE nameplate = ? AND uses_left > 0", (nameplate,))
        if refusal is not None:
            raise refusal
        return invite

    # -- certificates -----------------------------------------------------------------------

    def record(self, cert: x509.Certificate, name: str, cert_days: int, nameplate: int | None) -> Issued:
        now = self.clock()
        serial = serial_hex(cert.serial_number)
        not_after = cert.not_valid_after_utc.timestamp()
        with self._tx() as db:
            db.execute("INSERT INTO issued (serial, name, not_after, issued, cert_days, nameplate) VALUES "
                       "(?, ?, ?, ?, ?, ?)", (serial, name, not_after, now, cert_days, nameplate))
        return Issued(serial, name, not_after, now, None, None, cert_days)

    def certificates(self) -> list[Issued]:
        with self._tx(write=False) as db:
            rows = db.execute("SELECT serial, name, not_after, issued, revoked, last_seen, cert_days FROM issued "
                              "ORDER BY name, issued").fetchall()
        return [Issued(*row) for row in rows]

    def get(self, serial: int) -> Issued | None:
        with self._tx(write=False) as db:
            row = db.execute("SELECT serial, name, not_after, issued, revoked, last_seen, cert_days FROM issued "
                             "WHERE serial = ?", (serial_hex(serial),)).fetchone()
        return Issued(*row) if row else None

    def revoke(self, which: str, *, extra: Sequence[x509.Certificate] = ()) -> list[Issued]:
        """Revoke every live certificate named ``which``, or the one with that serial (hex).

        ``extra`` are certificates not issued through invites (``gen-certs --client`` files) to put on
        the denylist as well. Returns what was newly revoked.
        """
        now = self.clock()
        key = which.strip()
        serial_key = key.upper().replace(":", "")
        with self._tx() as db:
            for cert in extra:
                db.execute("INSERT OR IGNORE INTO issued (serial, name, not_after, issued, cert_days) VALUES "
                           "(?, ?, ?, ?, 0)", (serial_hex(cert.serial_number), key,
                                                cert.not_valid_after_utc.timestamp(), now))
            rows = db.execute("SELECT serial, name, not_after, issued, revoked, last_seen, cert_days FROM issued "
                              "WHERE revoked IS NULL AND (name = ? OR serial = ?)", (key, serial_key)).fetchall()
            db.execute("UPDATE issued SET revoked = ? WHERE revoked IS NULL AND (name = ? OR serial = ?)",
                       (now, key, serial_key))
        return [Issued(row[0], row[1], row[2], row[3], now, row[5], row[6]) for row in rows]

    def revoked_serials(self) -> frozenset[str]:
        with self._tx(write=False) as db:
            return frozenset(row[0] for row in db.execute("SELECT serial FROM issued WHERE revoked IS NOT NULL"))

    def held_names(self) -> frozenset[str]:
        """Names that belong to a live (unrevoked, unexpired) certificate: no guest may take them."""
        now = self.clock()
        with self._tx(write=False) as db:
            return frozenset(row[0] for row in db.execute(
                "SELECT DISTINCT name FROM issued WHERE revoked IS NULL AND not_after > ?", (now,)))

    def seen(self, serial: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE issued SET last_seen = ? WHERE serial = ?", (self.clock(), serial_hex(serial)))
