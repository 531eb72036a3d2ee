"""File sharing, the chat side: ``/ticket`` (who may move which file), who may fetch what, and the room's line.

A transfer is authorised on the chat session, where the server knows who is asking: the session asks
``/ticket put`` (a room or a person, a name, a size) or ``/ticket get ID`` and gets a short-lived
ticket for one transfer, which it presents on a file connection (ALPN ``securechat-file/1``, served
by :mod:`securechat.server.filehandler`). Nothing on a file connection is trusted beyond its ticket.

Who may fetch a file is who may read the line it was shared with:

- a room's file: whoever is in that room (a file id alone, even known, opens nothing);
- a private file: its sender and its recipient. Under mutual TLS (or a nick bound to a certificate)
  a nick *is* a person. A guest's nick is a person only while it holds it: a guest may fetch a
  private file shared after it took its nick, never one shared with an earlier holder of the same nick.

Anything else gets the same answer as an id that does not exist (``no such file``), so ids cannot be
probed. Ids are random (:func:`securechat.wire.filexfer.new_id`), not counters.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from securechat.store.files import RESUME_SECONDS, FileRecord, FileStore, Partial
from securechat.wire import filexfer, protocol
from securechat.wire.filexfer import human_size
from securechat.wire.ids import room_key

if TYPE_CHECKING:
    from securechat.server.room import Room
    from securechat.server.rooms import Rooms

log = logging.getLogger("securechat.files")

# A ticket not used within this time is void: the client asks for it right before connecting.
TICKET_SECONDS = 60.0

# Tickets one person may hold at once (uploads in progress included): a few files at a time.
MAX_TICKETS_PER_OWNER = 8

# Tickets on the server at once: every person's few, with room to spare; bounds the table.
MAX_TICKETS = 4096

# Transfers moving at once on the server: each holds at most two 1 MiB batches (or a chunk in
# flight), so this bounds their memory to ~128 MiB; one more is told "busy" and its client tries again.
MAX_TRANSFERS = 64

# Expired tickets and abandoned uploads are cleared this often (seconds).
CLEAN_INTERVAL = 10.0


class Requester(Protocol):
    """What the service needs of a chat session (the server's Session)."""

    nick: str
    bound_nick: str | None  # the certificate's name, when the nick is bound to one
    nick_since: float  # when this session took its current nick (wall clock)
    joined: list[Room]
    current: Room | None

    def reply(self, text: str) -> None: ...


@dataclass(eq=False)
class Upload:
    """An upload's state across connections (it may be resumed on a new one)."""

    partial: Partial | None = None
    handler: Any = None  # the file connection driving it now (None: dropped)
    busy: int = 0  # disk writes not yet done
    dropped: float = 0.0  # monotonic time it was last dropped
    over: bool = False  # failed for good: its partial file goes as soon as no write is pending


@dataclass(eq=False)
class Ticket:
    """What one transfer is allowed to do."""

    token: str
    op: str  # "put" or "get"
    owner: str  # whose quota and ticket allowance (a nick key)
    expires: float  # monotonic
    # put
    sender: str = ""
    name: str = ""
    size: int = 0
    room: str = ""
    recipient: str = ""
    recipient_key: str = ""
    upload: Upload | None = None
    # get
    record: FileRecord | None = None
    reserved: int = field(default=0)  # quota held for a put


def person_key(nick: str) -> str:
    """The form in which a sender or recipient is recorded and compared."""
    return protocol.nick_key(nick)


def may_fetch(record: FileRecord, who: Requester) -> bool:
    """Whether ``who`` may download ``record`` (see the module docstring)."""
    if record.room:
        key = room_key(record.room)
        return any(room.key == key for room in who.joined)
    me = person_key(who.nick)
    if me not in (record.sender_key, record.recipient_key):
        return False
    return who.bound_nick is not None or who.nick_since <= record.created


class FileService:
    """Tickets, access, announcements; the file connections' shared state (any thread)."""

    def __init__(self, store: FileStore, rooms: Rooms, *, origin: str = "") -> None:
        self.store = store
        self.rooms = rooms
        self.origin = origin  # this server's name in a shared index ("" alone)
        self._lock = threading.Lock()
        self._tickets: dict[str, Ticket] = {}
        self._moving = 0  # file connections past their ticket (MAX_TRANSFERS)
        self._stop = threading.Event()
        self._cleaner = threading.Thread(target=self._clean_loop, name="securechat-tickets", daemon=True)

    def start(self) -> None:
        self.store.start()
        self._cleaner.start()

    def close(self) -> None:
        self._stop.set()
        if self._cleaner.is_alive():
            self._cleaner.join(2)
        with self._lock:
            tickets = list(self._tickets.values())
            self._tickets.clear()
        for ticket in tickets:
            self._void(ticket)
        self.store.close()

    # -- /ticket -------------------------------------------------------------------------------

    def command(self, who: Requester, arg: str) -> None:
        """``/ticket put TAG TARGET SIZE NAME`` or ``/ticket get TAG ID``: one answer line."""
        op, _, rest = arg.strip().partition(" ")
        words = rest.split(None, 3 if op == "put" else 1)
        tag = words[0] if words else ""
        if not filexfer.TAG_RE.match(tag) or op not in ("put", "get"):
            who.reply("usage: /ticket put TAG #ROOM|NICK|- SIZE NAME, or /ticket get TAG ID (the securechat client "
                      "sends these for /send and /get)")
            return
        try:
            token = self._put(who, words[1:]) if op == "put" else self._get(who, words[1:])
        except _Refused as exc:
            who.reply(filexfer.ticket_refused(tag, str(exc)))
            return
        except Exception as exc:  # the index is away (Redis down, a disk error): the chat goes on
            log.error("files: cannot answer /ticket: %s", exc)
            who.reply(filexfer.ticket_refused(tag, "file sharing is unavailable right now: try again later"))
            return
        who.reply(filexfer.ticket_ok(tag, token))

    def _put(self, who: Requester, words: list[str]) -> str:
        # SIZE: a whole number of bytes; 18 digits is past any disk (and keeps it an exact float).
        if len(words) != 3 or not (words[1].isascii() and words[1].isdigit() and len(words[1]) <= 18):
            raise _Refused("usage: /ticket put TAG #ROOM|NICK|- SIZE NAME")
        target, size, name = words[0], int(words[1]), filexfer.clean_name(words[2])
        room, recipient, recipient_key = self._target(who, target)
        owner = person_key(who.nick)
        self._admit(owner)
        refusal = self.store.reserve(owner, size)
        if refusal is not None:
            raise _Refused(refusal)
        ticket = Ticket(filexfer.new_ticket(), "put", owner, time.monotonic() + TICKET_SECONDS, sender=who.nick,
                        name=name, size=size, room=room, recipient=recipient, recipient_key=recipient_key,
                        reserved=size)
        return self._issue(ticket)

    def _target(self, who: Requester, target: str) -> tuple[str, str, str]:
        """(room, recipient, recipient key) for a put's TARGET; _Refused when it cannot be shared there."""
        if target == filexfer.CURRENT_ROOM:
            if who.current is None:
                raise _Refused("you are in no room: /join one, or send to a nick")
            return who.current.name, "", ""
        if target.startswith("#"):
            key = room_key(target[1:])
            for room in who.joined:
                if room.key == key:
                    return room.name, "", ""
            raise _Refused(f"you are not in #{protocol.sanitize(target[1:])}: /join it first")
        rooms = self.rooms
        member = rooms.find(target)
        if member is not None:
            return "", member.nick, person_key(member.nick)
        if rooms.directory.online(target):
            return "", target, person_key(target)
        if rooms.offline_messages and protocol.nick_error(target) is None:  # kept for a person, as a /msg
            person = rooms.persons(target) if rooms.persons is not None else target
            if person is not None:
                return "", person, person_key(person)
        raise _Refused(f"no such nick: {protocol.sanitize(target)}")

    def _get(self, who: Requester, words: list[str]) -> str:
        file_id = words[0].strip() if words else ""
        if not filexfer.ID_RE.match(file_id):
            raise _Refused(f"no such file: {protocol.sanitize(file_id)[:40]}")
        record = self.store.index.get(file_id)
        if record is None or not may_fetch(record, who):
            log.info("%s asked for file %s: %s", who.nick, file_id, "not allowed" if record else "no such file")
            raise _Refused(f"no such file: {file_id}")
        owner = person_key(who.nick)
        self._admit(owner)
        return self._issue(Ticket(filexfer.new_ticket(), "get", owner, time.monotonic() + TICKET_SECONDS,
                                  record=record))

    def _admit(self, owner: str) -> None:
        with self._lock:
            held = sum(1 for t in self._tickets.values() if t.owner == owner)
            if held >= MAX_TICKETS_PER_OWNER:
                raise _Refused(f"you have {held} transfers going already: wait for one to end")
            if len(self._tickets) >= MAX_TICKETS:
                raise _Refused("the server is busy with other transfers: try again in a minute")

    def _issue(self, ticket: Ticket) -> str:
        with self._lock:
            self._tickets[ticket.token] = ticket
        return ticket.token

    # -- the file connections' side --------------------------------------------------------------

    def enter(self) -> bool:
        """A file connection is about to move bytes: False when MAX_TRANSFERS are moving already."""
        with self._lock:
            if self._moving >= MAX_TRANSFERS:
                return False
            self._moving += 1
            return True

    def leave(self) -> None:
        """A connection that :meth:`enter`-ed has ended."""
        with self._lock:
            self._moving -= 1

    def claim(self, token: str, op: str) -> Ticket | None:
        """The live ticket ``token`` for ``op``, or None. A get ticket is used up here; a put ticket
        stays until its upload ends (it resumes the upload)."""
        with self._lock:
            ticket = self._tickets.get(token)
            if ticket is None or ticket.op != op or ticket.expires < time.monotonic():
                return None
            if op == "get":
                del self._tickets[token]
            elif ticket.upload is None:
                ticket.upload = Upload()
            return ticket

    def done(self, ticket: Ticket) -> None:
        """An upload ended (stored or failed for good): the ticket is void, its quota hold given back."""
        with self._lock:
            if self._tickets.get(ticket.token) is ticket:
                del self._tickets[ticket.token]
        self._release(ticket)

    def dropped(self, ticket: Ticket) -> None:
        """An upload's connection went away: it may be resumed for store.RESUME_SECONDS."""
        upload = ticket.upload
        if upload is not None:
            upload.handler = None
            upload.dropped = time.monotonic()
        ticket.expires = time.monotonic() + RESUME_SECONDS

    def _release(self, ticket: Ticket) -> None:
        if ticket.reserved:
            self.store.release(ticket.owner, ticket.reserved)
            ticket.reserved = 0

    def _void(self, ticket: Ticket) -> None:
        """A ticket ends unused or its upload was abandoned: remove what it left on disk."""
        upload = ticket.upload
        if upload is not None and upload.partial is not None and upload.handler is None and not upload.busy:
            upload.partial.discard()
        self._release(ticket)

    def clean(self) -> None:
        """Forget expired tickets; remove the partial files of uploads nobody resumed."""
        now = time.monotonic()
        with self._lock:
            gone = [t for t in self._tickets.values() if t.expires < now
                    and (t.upload is None or (t.upload.handler is None and not t.upload.busy))]
            for ticket in gone:
                del self._tickets[ticket.token]
        for ticket in gone:
            if ticket.upload is not None and ticket.upload.partial is not None:
                log.info("upload of %s by %s abandoned half-way: removed", ticket.name, ticket.sender)
            self._void(ticket)

    def _clean_loop(self) -> None:
        while not self._stop.wait(CLEAN_INTERVAL):
            self.clean()

    # -- a finished upload -----------------------------------------------------------------------

    def complete(self, ticket: Ticket, partial: Partial, declared_sha: str) -> FileRecord:
        """Check, store and index ``ticket``'s upload, then announce it (blocking: a worker's job).

        TransferError (the partial file removed) when its size or hash lies, or the disk refuses.
        """
        record = self.store.finish(partial, declared_sha, ticket.size, lambda sha: self._record(ticket, sha))
        self.announce(record)
        return record

    def _record(self, ticket: Ticket, sha256: str) -> FileRecord:
        """The index record of ``ticket``'s upload, whose bytes hash to ``sha256``."""
        return FileRecord(filexfer.new_id(), sha256, ticket.name, ticket.size, ticket.owner, ticket.sender,
                          person_key(ticket.sender), ticket.room, ticket.recipient, ticket.recipient_key,
                          time.time(), self.origin)

    def announce(self, record: FileRecord) -> None:
        """Tell the room (or the recipient) that ``record`` is there to fetch, as a line of its log.

        May block (a shared directory asks Redis who is online): a worker's job.
        """
        size = human_size(record.size)
        log.info("%s shared %s (%s) %s as %s", record.sender, record.name, size,
                 f"in #{record.room}" if record.room else f"with {record.recipient}", record.id)
        rooms = self.rooms
        if record.room:
            rooms.log.append(record.room, "notice", "", f"{record.sender} shared {record.name} ({size}): "
                             f"/get {record.id}")
            return
        online = rooms.find(record.recipient) is not None or rooms.directory.online(record.recipient)
        text = f"* shared {record.name} ({size}): /get {record.id}"
        rooms.log.append("@" + record.recipient, "private", record.sender, text, record.recipient,
                         store=not online and rooms.offline_messages)
        sender = rooms.find(record.sender)
        if sender is not None and sender.echo and person_key(record.sender) != record.recipient_key:
            sender.conn.send(protocol.private(record.sender, record.recipient, text))


class _Refused(Exception):
    """Why a ticket is refused (the text after ``refused: ``)."""
