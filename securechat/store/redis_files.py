"""Shared files across the servers of one Redis: the index there, the bytes pulled from whichever server holds them.

A file shared on server A can be fetched from server B. The choice, and why:

- **The index lives in Redis** (a hash per file, plus the sets that quota, retention and garbage
  collection need), so every server knows every file's name, size, hash and who may fetch it.
- **The bytes stay on the disk of the server that received them** and move only when another server
  is asked for them: B asks A *through Redis* (a request list per server, a reply list per fetch, 1 MiB
  at a time, a few chunks in flight), checks the SHA-256, and keeps the copy (content-addressed), so
  the next request on B is local. Redis already links every server of the chat, with its password and
  TLS (``rediss://``); going through it needs no server-to-server addresses (servers listen on
  ``0.0.0.0`` and cannot know which of their addresses another reaches), no new port, and no new trust
  between servers. Redis holds no more than the chunks in flight: storing whole files in Redis would put
  every gigabyte in its memory.
- A server that holds a file says so in ``holders:SHA`` (again at every start, under its new name), so
  when A is down a copy on C serves. While no holder is up the file cannot be fetched, and the
  client is told so in one line.

Bounded: each server answers fetches one chunk at a time from one thread, and a fetch gives up after
:data:`CHUNK_WAIT` seconds without a chunk (then the next holder is tried).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time

from securechat.store.files import FileIndex, FileRecord, FileStore
from securechat.store.redis_config import Backoff, RedisConfig, describe_redis_error, redis_errors
from securechat.wire.filexfer import SHA256_RE, TransferError

log = logging.getLogger("securechat.files")

# Bytes per chunk moved between servers, and chunks asked for ahead of the one awaited.
CHUNK = 1 << 20
WINDOW = 4

# A holder that sends no chunk for this long is taken for gone; the next one is tried.
CHUNK_WAIT = 5.0

# A server says it is alive this often, for three times as long (as the nick directory does).
ALIVE_TTL = 15.0

# Replies nobody collects (the fetching server died) vanish after this.
REPLY_TTL = 60

_FIELDS = ("id", "sha256", "name", "size", "owner", "sender", "sender_key", "room", "recipient", "recipient_key",
           "created", "origin")


def _record(fields: dict[str, str]) -> FileRecord | None:
    try:
        return FileRecord(fields["id"], fields["sha256"], fields["name"], int(fields["size"]), fields["owner"],
                          fields["sender"], fields["sender_key"], fields["room"], fields["recipient"],
                          fields["recipient_key"], float(fields["created"]), fields.get("origin", ""))
    except (KeyError, ValueError):
        return None


class RedisFileIndex(FileIndex):
    """The files of every server on one Redis (see the module docstring). Calls block: worker work."""

    def __init__(self, config: RedisConfig, *, days: float = 0.0) -> None:
        self.config = config
        self.origin = config.origin
        self.days = days
        self._client = config.client()
        self._bytes = config.client(binary=True)  # chunks are bytes, not text
        self._store: FileStore | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _key(self, *parts: str) -> str:
        return self.config.key("files", *parts)

    # -- the index --------------------------------------------------------------------------

    def add(self, record: FileRecord) -> None:
        pipe = self._client.pipeline(transaction=True)
        key = self._key("rec", record.id)
        pipe.hset(key, mapping={name: str(getattr(record, name)) for name in _FIELDS})
        if self.days > 0:  # Redis forgets it on its own even if no server sweeps
            pipe.expireat(key, int(record.created + self.days * 86400) + 3600)
        pipe.zadd(self._key("all"), {record.id: record.created})
        pipe.hset(self._key("owner", record.owner), record.id, record.size)
        pipe.sadd(self._key("sha", record.sha256), record.id)
        pipe.execute()

    def get(self, file_id: str) -> FileRecord | None:
        return _record(self._client.hgetall(self._key("rec", file_id)))

    def used(self, owner: str) -> int:
        return sum(int(size) for size in self._client.hvals(self._key("owner", owner)))

    def expire(self, before: float) -> list[FileRecord]:
        gone = []
        for file_id in self._client.zrangebyscore(self._key("all"), "-inf", before):
            record = self.get(file_id)
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(self._key("rec", file_id))
            pipe.zrem(self._key("all"), file_id)
            if record is not None:
                pipe.hdel(self._key("owner", record.owner), file_id)
                pipe.srem(self._key("sha", record.sha256), file_id)
            if pipe.execute()[0] and record is not None:  # another server may have swept it first
                gone.append(record)
        return gone

    def referenced(self, sha256: str) -> bool:
        return bool(self._client.scard(self._key("sha", sha256)))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(CHUNK_WAIT)
        for client in (self._client, self._bytes):
            with contextlib.suppress(*redis_errors()):
                client.close()

    # -- bytes between servers ----------------------------------------------------------------

    def start(self, store: FileStore) -> None:
        """Say which contents this server holds, then answer the other servers' fetches (a thread)."""
        self._store = store
        try:
            pipe = self._client.pipeline(transaction=False)
            for sha in store.blobs_held():
                pipe.sadd(self._key("holders", sha), self.origin)
            pipe.set(self._key("alive", self.origin), "1", px=int(ALIVE_TTL * 1000))
            pipe.execute()
        except redis_errors() as exc:  # the chat goes on; copies made here are announced as they come
            log.warning("files: cannot tell Redis which files this server holds (%s)", describe_redis_error(exc))
        self._thread = threading.Thread(target=self._serve, name="securechat-files-redis", daemon=True)
        self._thread.start()

    def holding(self, sha256: str, held: bool = True) -> None:
        if held:
            self._client.sadd(self._key("holders", sha256), self.origin)
        else:
            self._client.srem(self._key("holders", sha256), self.origin)

    def fetch(self, record: FileRecord, store: FileStore) -> bool:
        """Pull ``record``'s bytes from a live holder into ``store``; False when none has them."""
        holders = [h for h in self._client.smembers(self._key("holders", record.sha256)) if h != self.origin]
        for holder in holders:
            if not self._client.exists(self._key("alive", holder)):
                continue
            try:
                if self._fetch_from(holder, record, store):
                    log.info("file %s (%s): copied here from %s", record.id, record.name, holder)
                    return True
            except TransferError as exc:
                log.warning("file %s: cannot copy it from %s: %s", record.id, holder, exc)
        return False

    def _fetch_from(self, holder: str, record: FileRecord, store: FileStore) -> bool:
        reply = self._key("reply", secrets.token_hex(8))
        partial = store.begin("fetch-" + secrets.token_hex(8))
        asked = 0

        def ask() -> None:
            nonlocal asked
            request = json.dumps({"sha": record.sha256, "offset": asked, "reply": reply})
            self._client.rpush(self._key("req", holder), request)
            asked += CHUNK

        try:
            for _ in range(WINDOW):
                if asked < record.size:
                    ask()
            while partial.offset < record.size:
                got = self._bytes.blpop([reply], timeout=CHUNK_WAIT)
                if got is None:
                    raise TransferError(f"no answer within {CHUNK_WAIT:g} s")
                chunk = got[1]
                if chunk[:1] != b"D" or not chunk[1:]:
                    raise TransferError(chunk[1:].decode("utf-8", "replace") or "no such content there")
                partial.write(chunk[1:])
                if asked < record.size:
                    ask()
            partial.close()
            if partial.offset != record.size or partial.digest() != record.sha256:
                raise TransferError("the copy does not match its SHA-256")
            store.adopt(partial.path, record.sha256)
        except BaseException:
            partial.discard()
            raise
        finally:
            with contextlib.suppress(*redis_errors()):
                self._client.delete(reply)
        self.holding(record.sha256)
        return True

    def _serve(self) -> None:
        """Answer fetches of this server's contents, one chunk at a time; keep saying this server is alive."""
        backoff = Backoff()
        requests = self._key("req", self.origin)
        next_alive = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_alive:
                    self._client.set(self._key("alive", self.origin), "1", px=int(ALIVE_TTL * 1000))
                    next_alive = time.monotonic() + ALIVE_TTL / 3
                got = self._client.blpop([requests], timeout=1)
                if got is not None:
                    self._answer(got[1])
                backoff.reset()
            except redis_errors() as exc:
                log.warning("files: Redis unreachable (%s); other servers cannot copy files from this one meanwhile",
                            describe_redis_error(exc))
                backoff.wait(self._stop)

    def _answer(self, raw: str) -> None:
        try:
            request = json.loads(raw)
            sha, offset, reply = str(request["sha"]), int(request["offset"]), str(request["reply"])
        except (ValueError, KeyError, TypeError):
            return
        if not SHA256_RE.match(sha) or not reply.startswith(self._key("reply", "")) or offset < 0:
            return
        assert self._store is not None
        try:
            with open(self._store.blob_path(sha), "rb") as blob:
                blob.seek(offset)
                answer = b"D" + blob.read(CHUNK)
        except OSError as exc:
            answer = b"E" + f"cannot read it ({exc.strerror or exc})".encode()
        pipe = self._bytes.pipeline(transaction=False)
        pipe.rpush(reply, answer)
        pipe.expire(reply, REPLY_TTL)
        pipe.execute()
