"""The server's file store on a real disk: limits, verification, retention, one server per directory."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from securechat.store.files import FileRecord, FilesError, FileStore
from securechat.wire.filexfer import TransferError, new_id


def _record(sha: str, size: int, *, owner: str = "alice", created: float = 1000.0) -> FileRecord:
    return FileRecord(new_id(), sha, "f.bin", size, owner, owner, owner, "lobby", "", "", created)


def _upload(store: FileStore, data: bytes, *, created: float = 1000.0, owner: str = "alice") -> FileRecord:
    partial = store.begin(new_id())
    partial.write(data)
    return store.finish(partial, hashlib.sha256(data).hexdigest(), len(data),
                        lambda sha: _record(sha, len(data), owner=owner, created=created))


def test_uploads_are_verified_stored_once_and_kept_private(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "files" / "5555")
    data = os.urandom(100_000)
    first, second = _upload(store, data), _upload(store, data)
    assert store.index.get(first.id) == first and store.index.get(second.id) == second
    assert list(store.blobs_held()) == [first.sha256] and os.listdir(store.partial) == []
    assert stat.S_IMODE(store.blob_path(first.sha256).stat().st_mode) == 0o600
    assert store.index.used("alice") == 2 * len(data)
    with store.open(first) as f:
        assert f.read() == data
    store.close()
    reopened = FileStore(tmp_path / "files" / "5555")  # the index survives a restart
    assert reopened.index.get(first.id) == first and reopened.index.used("alice") == 2 * len(data)
    reopened.close()


@pytest.mark.parametrize("declared_size, declared_sha, words", [
    (99, None, "the size does not match: 100 bytes arrived, 99 were declared"),
    (100, "0" * 64, "the SHA-256 does not match"),
    (100, "not a hash", "the SHA-256 does not match"),
])
def test_a_lie_removes_the_upload(tmp_path: Path, declared_size: int, declared_sha: str | None, words: str) -> None:
    store = FileStore(tmp_path / "files")
    data = os.urandom(100)
    partial = store.begin("k")
    partial.write(data)
    with pytest.raises(TransferError, match=words):
        store.finish(partial, declared_sha or hashlib.sha256(data).hexdigest(), declared_size,
                     lambda sha: _record(sha, len(data)))
    assert os.listdir(store.partial) == [] and list(store.blobs_held()) == []
    store.close()


def test_quota_counts_what_is_kept_and_what_is_on_its_way(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "files", max_size=1000, quota=1500)
    assert store.reserve("alice", 1001) == "too large: 1001 bytes, this server takes files up to 1000 bytes"
    _upload(store, b"x" * 800)
    assert store.reserve("alice", 600) is None  # 800 kept + 600 on its way
    assert store.reserve("alice", 200) == "over your quota: you share 1.4 KiB of 1.5 KiB; 100 bytes left"
    assert store.reserve("bob", 1000) is None
    store.release("alice", 600)
    assert store.reserve("alice", 700) is None
    store.close()


def test_retention_forgets_old_files_and_removes_bytes_nothing_refers_to(tmp_path: Path) -> None:
    now = [100 * 86400.0]
    store = FileStore(tmp_path / "files", days=30, clock=lambda: now[0])
    old = _upload(store, b"old" * 100, created=now[0] - 31 * 86400)
    shared = os.urandom(50)
    old_copy = _upload(store, shared, created=now[0] - 31 * 86400)
    recent = _upload(store, shared, created=now[0] - 86400)  # the same bytes, shared again lately
    store.sweep()
    assert store.index.get(old.id) is None and store.index.get(old_copy.id) is None
    assert store.index.get(recent.id) == recent
    assert sorted(store.blobs_held()) == [recent.sha256]  # old's bytes went; recent's stayed
    assert store.index.used("alice") == 50
    store.close()


def test_one_server_per_directory_and_stale_partials_go(tmp_path: Path) -> None:
    root = tmp_path / "files" / "5555"
    store = FileStore(root)
    store.begin("left-over").write(b"half")
    with pytest.raises(FilesError, match="in use by another securechat server"):
        FileStore(root)
    store.close()
    again = FileStore(root)  # a restart cannot resume an upload (no hash state): its partial goes
    assert os.listdir(again.partial) == []
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    again.close()


def test_a_directory_that_cannot_be_used_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "files").write_text("a file where the directory should be")
    with pytest.raises(FilesError, match=r"^cannot use .*files/5555: "):
        FileStore(tmp_path / "files" / "5555")
