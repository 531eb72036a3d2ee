"""The CA's ledger: invites, the client certificates they led to (issued, renewed, revoked), and the names given out.

Everything lives in one SQLite file beside the CA (``certs/invites.db``, mode 0600, like ``ca.key``),
because several processes use it at once: ``securechat invite`` / ``revoke`` / ``gen-certs`` on the
operator's terminal, and the running server, which reads it on every enrollment and every half second
for revocations. SQLite's locking makes each step atomic across processes: claiming the last use of an
invite is one ``UPDATE ... WHERE uses_left > 0`` inside ``BEGIN IMMEDIATE``, so two joiners racing with
one code get one certificate between them, never two.

Every decision is *checked and recorded in one transaction*: a certificate is signed first, but it is
only handed out once :meth:`Store.record` or :meth:`Store.renew` has committed it, and those refuse (in
the same write transaction that would record it) a revoked name, another spelling of a name already
given out, a renewal outside its window or of a certificate already renewed. ``revoke`` runs in a write
transaction too, so a renewal either commits before it (and is revoked with the rest) or sees it.

Revocation is a serial denylist (the ``revoked`` column) plus *names*: ``revoke NAME`` revokes every
certificate with that name and the name itself (table ``names``), so a certificate of that name issued
or presented later is refused as well, until ``revoke --release NAME``. ``revoke SERIAL`` revokes the
certificate's whole renewal chain (``parent``/``child`` links). A CRL was rejected: Python's ``ssl``
fails every handshake when a configured CRL is missing or stale, and could not cut a session that is
already open anyway. What servers enforce is :meth:`Store.snapshot`; each write bumps a generation
number so that readers (and the Redis copy a cluster reads) notice a change with one cheap query.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from securechat.pki import names
from securechat.pki.codes import NAMEPLATE_MAX, format_code, new_words
from securechat.pki.names import Held
from securechat.wire import protocol

DB_NAME = "invites.db"

# The issue's bound: an attacker who guesses online gets at most this many wrong tries per invite.
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
# A client certificate is renewed in the last third of its lifetime, and once in it (the issue's rule).
RENEW_FRACTION = 1 / 3


class InviteError(Exception):
    """Why an invite cannot be used: one line, said to the joiner and logged by the server."""


class StoreError(Exception):
    """The store cannot be opened or written (a command-line failure: one line, exit 1)."""


class Refused(StoreError):
    """The ledger will not record a name or a certificate (revoked, taken, outside its window): one line.

    A StoreError, so every command that writes the ledger reports it the same way (one line, exit 1).
    """


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
    parent: str | None = None  # the certificate this one renewed
    child: str | None = None  # the certificate that renewed (and so replaced) this one


@dataclass(frozen=True)
class LedgerState:
    """What every server enforces: the denylist, the certificates replaced by renewal, the names given out.

    Expired certificates are left out (TLS refuses them anyway), so it stays small.
    """

    generation: int  # bumped by every change; equal generations mean equal states
    revoked: frozenset[str]  # serials (hex)
    superseded: frozenset[str]  # serials whose renewal replaced them
    held: dict[str, Held]  # names.key(name) -> how that name is held


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
CREATE TABLE IF NOT EXISTS names (
    key TEXT PRIMARY KEY,   -- names.key(name): folded
    name TEXT NOT NULL,     -- the spelling given out
    state TEXT NOT NULL,    -- names.STATES
    until REAL              -- invited: when the last invite for it ends
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
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

# Columns the issued table gained after its first release; added to older files on opening.
_ISSUED_COLUMNS = (("name_key", "TEXT"), ("not_before", "REAL"), ("parent", "TEXT"), ("child", "TEXT"),
                   ("der", "BLOB"))
_ISSUED = "serial, name, not_after, issued, revoked, last_seen, cert_days, parent, child"


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
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            try:
                db.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                self._upgrade(db)
                db.execute("COMMIT")
            finally:
                db.close()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from None
        self._ready = True

    @staticmethod
    def _upgrade(db: sqlite3.Connection) -> None:
        """Bring a file written by an older securechat up to date (inside the creating transaction).

        Names of certificates issued before the names table existed are entered as issued, or as
        revoked when every certificate of theirs was: reserved, the safe side.
        """
        have = {row[1] for row in db.execute("PRAGMA table_info(issued)")}
        for column, kind in _ISSUED_COLUMNS:
            if column not in have:
                db.execute(f"ALTER TABLE issued ADD COLUMN {column} {kind}")
        db.execute("CREATE INDEX IF NOT EXISTS issued_key ON issued(name_key)")
        rows = db.execute("SELECT serial, name, revoked FROM issued WHERE name_key IS NULL").fetchall()
        alive: dict[str, tuple[str, bool]] = {}
        for serial, name, revoked in rows:
            key = names.key(name)
            db.execute("UPDATE issued SET name_key = ? WHERE serial = ?", (key, serial))
            spelling, live = alive.get(key, (name, False))
            alive[key] = (spelling, live or revoked is None)
        for key, (spelling, live) in alive.items():
            db.execute("INSERT OR IGNORE INTO names (key, name, state) VALUES (?, ?, ?)",
                       (key, spelling, names.ISSUED if live else names.REVOKED))
        if rows:
            _bump(db)

    # -- invites ----------------------------------------------------------------------------

    def create(self, name: str | None, *, expires_in: float = DEFAULT_EXPIRES, uses: int = 1,
               cert_days: int = DEFAULT_CERT_DAYS) -> Invite:
        """A new invite with a fresh code and an unused nameplate."""
        now = self.clock()
        words = new_words()
        with self._tx() as db:
            if name is not None:  # the name rule, in the transaction that reserves the name
                self._hold_name(db, name, names.INVITED, now + expires_in)
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
            for name in {row[1] for row in rows if row[1]}:
                self._unhold_invited(db, name, now)
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

    # -- names -------------------------------------------------------------------------------

    def _held(self, db: sqlite3.Connection, key: str) -> Held | None:
        row = db.execute("SELECT name, state, until FROM names WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        held = Held(*row)
        return held if held.alive(self.clock()) else None  # an invitation that ended holds nothing

    def _hold_name(self, db: sqlite3.Connection, name: str, state: str, until: float | None = None) -> None:
        """Give ``name`` out (invited or issued) under the name rule, or raise Refused (write transaction)."""
        key = names.key(name)
        held = self._held(db, key)
        why = names.refusal(name, held)
        if why is not None:
            raise Refused(why)
        if held is None or held.state == names.INVITED and state == names.ISSUED:
            db.execute("INSERT OR REPLACE INTO names (key, name, state, until) VALUES (?, ?, ?, ?)",
                       (key, name, state, until))
        elif held.state == names.INVITED and until is not None:
            db.execute("UPDATE names SET until = MAX(until, ?) WHERE key = ?", (until, key))
        else:
            return
        _bump(db)

    def _unhold_invited(self, db: sqlite3.Connection, name: str, now: float) -> None:
        """An invite for ``name`` was cancelled: an invitation no other live invite backs is dropped."""
        key = names.key(name)
        live = [row[0] for row in db.execute("SELECT name FROM invites WHERE state = 'active' AND expires > ?",
                                             (now,)) if row[0] and names.key(row[0]) == key]
        if not live and db.execute("DELETE FROM names WHERE key = ? AND state = ?", (key, names.INVITED)).rowcount:
            _bump(db)

    # The name rule inside a caller's write transaction, for the other credentials the CA hands out
    # (browser devices: securechat.pki.devices), so every name goes through this one rule.
    held = _held
    hold_name = _hold_name
    unhold_invited = _unhold_invited

    def name_refusal(self, name: str) -> str | None:
        """Why ``name`` may not be given out now (:func:`names.refusal`), or None."""
        with self._tx(write=False) as db:
            return names.refusal(name, self._held(db, names.key(name)))

    def release(self, name: str) -> str:
        """``revoke --release NAME``: the name may be given out (and taken by guests) again; its spelling.

        Refused while a valid certificate still bears it: revoke those first.
        """
        key = names.key(name)
        now = self.clock()
        with self._tx() as db:
            row = db.execute("SELECT name FROM names WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise Refused(f"no name {name!r} is held by the CA ('securechat certs' lists what it issued)")
            live = db.execute("SELECT COUNT(*) FROM issued WHERE name_key = ? AND revoked IS NULL AND not_after > ?",
                              (key, now)).fetchone()[0]
            if live:
                raise Refused(f"{row[0]!r} still has {live} valid certificate{'s' if live != 1 else ''}: revoke "
                              f"{'them' if live != 1 else 'it'} first ('securechat revoke {row[0]}')")
            db.execute("DELETE FROM names WHERE key = ?", (key,))
            _bump(db)
        return str(row[0])

    # -- certificates -----------------------------------------------------------------------

    def record(self, cert: x509.Certificate, name: str, cert_days: int, nameplate: int | None = None) -> Issued:
        """Enter a certificate just signed for ``name``; Refused (and nothing recorded) under the name rule.

        The caller hands the certificate out only once this returns: the check and the record are one
        transaction, so a revocation of the name either came before (refused here) or comes after
        (and revokes it).
        """
        now = self.clock()
        with self._tx() as db:
            self._hold_name(db, name, names.ISSUED)
            self._insert(db, cert, name, cert_days, nameplate, None, now)
            _bump(db)
        return Issued(serial_hex(cert.serial_number), name, cert.not_valid_after_utc.timestamp(), now, None, None,
                      cert_days)

    @staticmethod
    def _insert(db: sqlite3.Connection, cert: x509.Certificate, name: str, cert_days: int, nameplate: int | None,
                parent: str | None, now: float) -> None:
        db.execute("INSERT INTO issued (serial, name, name_key, not_before, not_after, issued, cert_days, nameplate, "
                   "parent, der) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (serial_hex(cert.serial_number), name, names.key(name), cert.not_valid_before_utc.timestamp(),
                    cert.not_valid_after_utc.timestamp(), now, cert_days, nameplate, parent,
                    cert.public_bytes(serialization.Encoding.DER)))

    def renew(self, current: x509.Certificate, public_key: object,
              sign: Callable[[str, int], x509.Certificate]) -> tuple[Issued, bytes]:
        """Renew ``current`` for ``public_key`` (a renewal request's): check, sign and record in one transaction.

        ``sign(name, cert_days)`` makes the new certificate; it is called only once every check passed,
        inside the write transaction (a signature takes a millisecond), so nothing is signed in vain and
        nothing signed escapes the checks. Returns the certificate to hand out and its DER: the new one,
        or, when ``current`` was already renewed for that very key (the answer was lost on the way),
        the one recorded then. Refused, with nothing recorded, when ``current`` is unknown, revoked
        (itself, its chain or its name), not yet in the last third of its lifetime, or already renewed
        for another key.
        """
        serial = serial_hex(current.serial_number)
        now = self.clock()
        with self._tx() as db:
            row = db.execute(f"SELECT {_ISSUED} FROM issued WHERE serial = ?", (serial,)).fetchone()
            if row is None:
                raise Refused("this certificate was not issued through an invite: ask for an invite")
            issued = Issued(*row)
            held = self._held(db, names.key(issued.name))
            if issued.revoked is not None or held is not None and held.state == names.REVOKED:
                raise Refused(f"{protocol.CERT_REVOKED}: it cannot be renewed")
            if issued.child is not None:
                child = db.execute("SELECT der, revoked FROM issued WHERE serial = ?", (issued.child,)).fetchone()
                if child is not None and child[1] is None and child[0] is not None:
                    again = x509.load_der_x509_certificate(child[0])
                    if again.public_key() == public_key:
                        return self._issued(db, issued.child), bytes(child[0])
                raise Refused(f"this certificate was already renewed (as {issued.child}); a certificate is renewed "
                              "once: if that was not you, tell the server's admin")
            opens = renewal_opens(current)
            if now < opens:
                raise Refused(f"too early: a certificate is renewed in the last third of its life, from {utc(opens)}")
            self._hold_name(db, issued.name, names.ISSUED)  # the same spelling: checks, and keeps it issued
            days = issued.cert_days or DEFAULT_CERT_DAYS  # 0: entered from a file, its lifetime unknown
            renewed = sign(issued.name, days)
            self._insert(db, renewed, issued.name, days, None, serial, now)
            db.execute("UPDATE issued SET child = ? WHERE serial = ?", (serial_hex(renewed.serial_number), serial))
            _bump(db)
            return self._issued(db, serial_hex(renewed.serial_number)), renewed.public_bytes(serialization.Encoding.DER)

    @staticmethod
    def _issued(db: sqlite3.Connection, serial: str) -> Issued:
        return Issued(*db.execute(f"SELECT {_ISSUED} FROM issued WHERE serial = ?", (serial,)).fetchone())

    def certificates(self) -> list[Issued]:
        with self._tx(write=False) as db:
            rows = db.execute(f"SELECT {_ISSUED} FROM issued ORDER BY name, issued").fetchall()
        return [Issued(*row) for row in rows]

    def get(self, serial: int) -> Issued | None:
        with self._tx(write=False) as db:
            row = db.execute(f"SELECT {_ISSUED} FROM issued WHERE serial = ?", (serial_hex(serial),)).fetchone()
        return Issued(*row) if row else None

    def revoke(self, which: str, *, extra: Sequence[x509.Certificate] = ()) -> Revocation:
        """Revoke by serial (hex: the certificate and its whole renewal chain) or by name.

        By name: every certificate whose name folds to it, the live invites for it, and the name
        itself, so a certificate of that name issued or presented later is refused too, until
        :meth:`release`. ``extra`` are certificates not issued through invites (``gen-certs --client``
        files from before the ledger) to enter under the name first.
        """
        now = self.clock()
        key = which.strip()
        serial_key = key.upper().replace(":", "")
        with self._tx() as db:
            for cert in extra:
                db.execute("INSERT OR IGNORE INTO issued (serial, name, name_key, not_before, not_after, issued, "
                           "cert_days) VALUES (?, ?, ?, ?, ?, ?, 0)",
                           (serial_hex(cert.serial_number), key, names.key(key),
                            cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp(), now))
            invites: list[int] = []
            if db.execute("SELECT 1 FROM issued WHERE serial = ?", (serial_key,)).fetchone():
                serials, name = _chain(db, serial_key), None
            else:
                serials, name, invites = self._revoke_name(db, key, now)
            rows = [Issued(*row) for serial in serials for row in
                    db.execute(f"SELECT {_ISSUED} FROM issued WHERE serial = ? AND revoked IS NULL", (serial,))]
            for serial in serials:
                db.execute("UPDATE issued SET revoked = ? WHERE revoked IS NULL AND serial = ?", (now, serial))
            if rows or name or invites:
                _bump(db)
        return Revocation([replace(row, revoked=now) for row in rows], name, invites)

    def _revoke_name(self, db: sqlite3.Connection, which: str, now: float) -> tuple[list[str], str | None, list[int]]:
        """(serials to revoke, the name now revoked or None, invites cancelled) for ``revoke NAME``."""
        key = names.key(which)
        serials = [row[0] for row in db.execute("SELECT serial FROM issued WHERE name_key = ?", (key,))]
        if not serials and protocol.nick_error(which) is not None:
            return [], None, []
        invites = [row[0] for row in db.execute("SELECT nameplate, name FROM invites WHERE state = 'active' AND "
                                                "expires > ?", (now,)) if row[1] and names.key(row[1]) == key]
        for nameplate in invites:
            db.execute("UPDATE invites SET state = 'cancelled' WHERE nameplate = ?", (nameplate,))
        row = db.execute("SELECT name, state FROM names WHERE key = ?", (key,)).fetchone()
        if row is None and not serials:
            return [], None, invites
        spelling = row[0] if row else which
        if row is None or row[1] != names.REVOKED:
            db.execute("INSERT OR REPLACE INTO names (key, name, state, until) VALUES (?, ?, ?, NULL)",
                       (key, spelling, names.REVOKED))
            return serials, spelling, invites
        return serials, None, invites

    def snapshot(self) -> LedgerState:
        """What servers enforce, as of now (see :class:`LedgerState`)."""
        now = self.clock()
        with self._tx(write=False) as db:
            generation = _generation(db)
            revoked = frozenset(row[0] for row in db.execute(
                "SELECT serial FROM issued WHERE revoked IS NOT NULL AND not_after > ?", (now,)))
            superseded = frozenset(row[0] for row in db.execute(
                "SELECT serial FROM issued WHERE child IS NOT NULL AND revoked IS NULL AND not_after > ?", (now,)))
            held = {key: Held(name, state, until)
                    for key, name, state, until in db.execute("SELECT key, name, state, until FROM names")}
        return LedgerState(generation, revoked, superseded, {k: h for k, h in held.items() if h.alive(now)})

    def generation(self) -> int:
        """The ledger's generation: it changes whenever what :meth:`snapshot` says may have."""
        with self._tx(write=False) as db:
            return _generation(db)

    def seen(self, cert: x509.Certificate, name: str) -> None:
        """``cert`` (verified by TLS: this CA's) was just presented: note when, and enter it if the ledger
        never recorded it (a ``gen-certs --client`` certificate from before the ledger did), so that its
        name is held and ``revoke SERIAL`` knows it. One the name rule refuses is only not entered."""
        now = self.clock()
        serial = serial_hex(cert.serial_number)
        with self._tx() as db:
            if db.execute("UPDATE issued SET last_seen = ? WHERE serial = ?", (now, serial)).rowcount:
                return
            days = round((cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() / 86400)
            with contextlib.suppress(Refused):
                self._hold_name(db, name, names.ISSUED)
                self._insert(db, cert, name, days, None, None, now)
                db.execute("UPDATE issued SET last_seen = ? WHERE serial = ?", (now, serial))
                _bump(db)

    # -- the cluster's copy -------------------------------------------------------------------

    def note_published(self, where: str) -> None:
        """A server published the ledger to its cluster (``where``: the Redis URL, password hidden), now."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('published', ?)",
                       (f"{self.clock()!r} {where}",))

    def published(self) -> tuple[float, str] | None:
        """(when, where) the ledger was last published to a cluster, or None if it never was."""
        with self._tx(write=False) as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'published'").fetchone()
        if row is None:
            return None
        when, _, where = str(row[0]).partition(" ")
        return float(when), where


@dataclass(frozen=True)
class Revocation:
    """What one ``revoke`` did."""

    certificates: list[Issued]  # newly revoked
    name: str | None  # the name newly revoked (reserved until released), if any
    invites: list[int]  # nameplates of the live invites for that name, cancelled


def renewal_opens(cert: x509.Certificate) -> float:
    """When ``cert`` may be renewed: the last :data:`RENEW_FRACTION` of its lifetime (epoch seconds)."""
    start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    return end - (end - start) * RENEW_FRACTION


def _chain(db: sqlite3.Connection, serial: str) -> list[str]:
    """Every serial of ``serial``'s renewal chain: what it renewed, and what renewed it, transitively."""
    chain, todo = [], [serial]
    while todo:
        current = todo.pop()
        if current in chain:
            continue
        chain.append(current)
        for parent, child in db.execute("SELECT parent, child FROM issued WHERE serial = ?", (current,)):
            todo += [s for s in (parent, child) if s]
        todo += [row[0] for row in db.execute("SELECT serial FROM issued WHERE parent = ?", (current,))]
    return chain


def _generation(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    return int(row[0]) if row else 0


def bump(db: sqlite3.Connection) -> None:
    """A change readers must see: the next generation (inside the changing transaction)."""
    _bump(db)


def _bump(db: sqlite3.Connection) -> None:
    """A change readers must see: the next generation (inside the changing transaction)."""
    db.execute("INSERT INTO meta (key, value) VALUES ('generation', '1') ON CONFLICT(key) DO UPDATE SET "
               "value = CAST(value AS INTEGER) + 1")
