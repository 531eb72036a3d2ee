"""Files in a cluster (several servers on one real redis-server): shared on one server, fetched from any other."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from securechat.client import files as cf
from securechat.client.chat import ChatClient
from securechat.server.engine import ChatServer
from securechat.server.filehandler import install
from securechat.server.files import FileService
from securechat.store.files import FileStore
from securechat.store.redis_config import RedisConfig
from securechat.store.redis_directory import RedisDirectory
from securechat.store.redis_log import RedisRoomLog
from securechat.wire import tls
from securechat.wire.filexfer import TransferError
from tests.filehelp import sha, wait_line

MiB = 1 << 20


@pytest.fixture
def node(serve: Callable[..., ChatServer], tmp_path: Path,
         cert_files: dict[str, Path]) -> Iterator[Callable[[str], ChatServer]]:
    """``node(url)``: an in-process server sharing rooms and files through the Redis at ``url``."""
    servers: list[ChatServer] = []
    directories: list[RedisDirectory] = []

    def start(url: str) -> ChatServer:
        from securechat.store.redis_files import RedisFileIndex

        config = RedisConfig(url)
        directory = RedisDirectory(config)
        directory.start()
        directories.append(directory)
        server = serve(roomlog=RedisRoomLog(config), directory=directory,
                       context=tls.server_context(cert_files["cert"], cert_files["key"]))
        servers.append(server)
        store = FileStore(tmp_path / f"node{len(servers)}" / "files", index=RedisFileIndex(config))
        files = FileService(store, server.rooms, origin=config.origin)
        install(server, files)
        files.start()
        return server

    yield start
    for server in servers:
        server.shutdown()
        if server.files is not None:
            server.files.close()
    for directory in directories:
        directory.close()


def _client(server: ChatServer, ca: Path, nick: str) -> ChatClient:
    def factory() -> ssl.SSLContext:
        return tls.client_context(ca)

    client = ChatClient(reconnect=False)
    client.connect("127.0.0.1", server.address[1], ssl_context=factory(), context_factory=factory,
                   server_hostname="localhost")
    client.register(nick)
    return client


def _down(server: ChatServer) -> None:
    """As if the server were gone: it answers no fetch and is no longer announced alive."""
    assert server.files is not None
    index = server.files.store.index
    index.close()
    index._client = index.config.client()  # only to delete its own liveness key
    index._client.delete(index._key("alive", index.origin))


def test_a_file_shared_on_one_server_is_fetched_from_the_others(redis_server, node, cert_files, tmp_path) -> None:
    redis = redis_server()
    a, b, c = node(redis.url), node(redis.url), node(redis.url)
    alice, bob, carol = (_client(a, cert_files["ca"], "alice"), _client(b, cert_files["ca"], "bob"),
                         _client(c, cert_files["ca"], "carol"))
    try:
        data = os.urandom(5 * MiB + 3)
        (tmp_path / "deck.pdf").write_bytes(data)
        file_id, _, _ = cf.send_file(alice, tmp_path / "deck.pdf", "-")
        # Everyone hears of it, whatever their server, and fetches it from there.
        assert wait_line(bob, lambda line: "shared" in line) == f"* alice shared deck.pdf (5.0 MiB): /get {file_id}"
        out = tmp_path / "out"
        out.mkdir()
        assert cf.get_file(bob, file_id, out).read_bytes() == data
        assert b.files is not None and b.files.store.blob_path(sha(data)).exists()  # kept on B
        # A goes away: C still gets it, copied from B.
        _down(a)
        assert cf.get_file(carol, file_id, out).read_bytes() == data
        # Access is checked on the server asked: someone on B not in the room cannot have it.
        bob.send("/part")
        wait_line(bob, lambda line: "you left" in line)
        with pytest.raises(TransferError, match="no such file"):
            cf.get_file(bob, file_id, out)
    finally:
        for client in (alice, bob, carol):
            client.close()


def test_a_private_file_crosses_servers_and_a_gone_holder_is_one_line(redis_server, node, cert_files,
                                                                     tmp_path) -> None:
    redis = redis_server()
    a, b = node(redis.url), node(redis.url)
    alice, bob = _client(a, cert_files["ca"], "alice"), _client(b, cert_files["ca"], "bob")
    try:
        (tmp_path / "note.txt").write_bytes(b"for bob")
        file_id, _, _ = cf.send_file(alice, tmp_path / "note.txt", "bob")  # bob is on the other server
        assert wait_line(bob, lambda line: "shared" in line) == \
            f"[alice -> bob] * shared note.txt (7 bytes): /get {file_id}"
        _down(a)  # the only server holding it
        with pytest.raises(TransferError, match="^the server holding this file cannot be reached: try again later$"):
            cf.get_file(bob, file_id, tmp_path)
        assert not list(tmp_path.glob(".securechat-*"))
    finally:
        alice.close()
        bob.close()
