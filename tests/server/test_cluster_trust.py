"""One authority over a Redis cluster: the CA's decisions hold on a server that has no ``ca.key`` (issue 17).

Set up as the README's multi-server recipe does it: chat1 holds the CA (``gen-certs`` there), chat2 gets
only ``server.pem``, ``server.key`` and ``ca.pem``. Real ``redis-server``, real ``securechat serve``
processes, ``securechat join``/``connect``/``revoke`` subprocesses, real TLS on 127.0.0.1.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.pki.test_invites import Machine, Reader, Server, _env, _guest, _say

# The bound: a revoked identity is dead everywhere within this many seconds.
WITHIN = 2.0


def _chat2_certs(chat1: Path, chat2: Path) -> None:
    """The recipe: a copy of the CA's directory issues chat2's certificate; only three files go over."""
    staging = chat1.parent / "certs-chat2"
    shutil.copytree(chat1 / "certs", staging)
    done = subprocess.run([sys.executable, "-m", "securechat", "gen-certs", "--out", str(staging), "--host",
                           "chat2.lan"], capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 0, done.stderr
    (chat2 / "certs").mkdir(parents=True, mode=0o700)
    for name in ("server.pem", "server.key", "ca.pem"):  # never ca.key
        shutil.copy2(staging / name, chat2 / "certs" / name)


@pytest.fixture
def cluster(tmp_path: Path, redis_server: Callable[..., object]) -> Iterator[tuple[Server, Server]]:
    """chat1 (the CA's machine) and chat2 (no ca.key), sharing one chat through a real redis-server."""
    redis = redis_server()
    url = redis.url  # type: ignore[attr-defined]
    started: list[Server] = []
    try:
        chat1 = Server(tmp_path / "chat1", "--redis", url)
        started.append(chat1)
        _chat2_certs(tmp_path / "chat1", tmp_path / "chat2")
        chat2 = Server(tmp_path / "chat2", "--redis", url)
        started.append(chat2)
        assert not (chat2.home / "certs" / "ca.key").exists()
        yield chat1, chat2
    finally:
        for server in started:
            server.stop()


def _until(what: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``what()`` held; AssertionError if it did not within ``timeout``."""
    started = time.monotonic()
    while not what():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


def _refused(server: Server, nick: str) -> bool:
    guest = _guest(server, nick)
    try:
        return guest.readline().startswith(f"* nickname refused: {nick!r} belongs to a certificate holder")
    finally:
        guest.close()


def _profile_files(machine: Machine) -> list[str]:
    (profile,) = machine.profile_dir.iterdir()
    return ["--ca", str(profile / "ca.pem"), "--cert", str(profile / "client.pem"),
            "--key", str(profile / "client.key")]


@pytest.mark.slow
def test_revoke_on_the_ca_machine_cuts_a_live_session_on_the_server_without_ca_key(
        cluster: tuple[Server, Server], tmp_path: Path) -> None:
    """Issue 17, finding 1 (and the issue's "done when"): only a server with ca.key checked the denylist."""
    chat1, chat2 = cluster
    alice = Machine(tmp_path / "alice")
    assert alice.join(chat1, chat1.invite("alice")).returncode == 0
    a = alice.chat(chat2, *_profile_files(alice))  # her certificate, on the other server
    a_out = Reader(a)
    a_out.expect("* welcome, alice!")
    bob = _guest(chat2, "bob")
    bob.expect("* welcome, bob!")
    _say(a, "hello from chat2")
    bob.expect("[alice] hello from chat2")

    started = time.monotonic()
    revoked = chat1.cli("revoke", "alice")  # on the CA's machine
    assert revoked.returncode == 0, revoked.stderr
    _, cut = a_out.expect("* your certificate has been revoked; goodbye", timeout=5)
    assert bob.expect("* alice left") == "* alice left (certificate revoked)"
    assert cut - started < WITHIN, f"cut after {cut - started:.2f} s"
    assert a.wait(10) == 1

    again = alice.run("connect", "127.0.0.1", "--port", str(chat2.port), *_profile_files(alice), "--nick", "alice")
    assert again.returncode == 1
    assert "refused the connection: your certificate has been revoked" in again.stderr
    assert "Traceback" not in again.stderr
    # Its name stays the person's on every server: no guest takes it on chat2 either.
    assert _refused(chat2, "alice") and _refused(chat2, "ALICE")
    chat2.wait_log("ending alice's session: your certificate has been revoked")


@pytest.mark.slow
def test_names_given_out_by_the_ca_are_no_guests_on_any_server(cluster: tuple[Server, Server],
                                                               tmp_path: Path) -> None:
    """Issue 17, finding 7: a name bound by an invite was free on the other servers of a cluster."""
    chat1, chat2 = cluster
    assert Machine(tmp_path / "alice").join(chat1, chat1.invite("alice")).returncode == 0
    chat1.invite("bob")  # invited, not joined yet: held already
    for nick in ("AIice", "alice", "B0B"):  # each within the bound of its publication
        _until(lambda: _refused(chat2, nick), WITHIN)  # noqa: B023 (called at once)
    carol = _guest(chat2, "carol")  # a name nobody was given is anyone's
    assert carol.readline().startswith("* welcome, carol!")
    # A guest already using a name when it is given out leaves it to its holder.
    dave = _guest(chat2, "dave")
    dave.expect("* welcome, dave!")
    chat1.invite("dave")
    assert dave.expect("* 'dave' now belongs", timeout=5) == ("* 'dave' now belongs to a certificate holder; reconnect "
                                                              "under another nickname; goodbye")
    assert carol.expect("* dave left") == "* dave left (nickname taken by its holder)"


def test_a_second_server_with_its_own_ca_key_does_not_publish_over_the_first(tmp_path: Path,
                                                                             redis_server: Callable[..., object],
                                                                             ) -> None:
    """A careless copy of the whole certs/ (ca.key and ledger included) to a second machine: two ledgers
    would overwrite each other's copy in Redis every half second, revocations coming and going."""
    redis = redis_server()
    url = redis.url  # type: ignore[attr-defined]
    first = Server(tmp_path / "chat1", "--redis", url)
    second = None
    try:
        second = Server(tmp_path / "chat3", "--redis", url)  # a CA (and ledger) of its own
        second.wait_log("another server publishes its CA ledger to")
        assert "two machines hold a ca.key" in second.log_path.read_text()
        import redis as redis_py

        raw = redis_py.Redis.from_url(url, decode_responses=True)
        time.sleep(1.0)  # several polls of both
        assert str(tmp_path / "chat1") in raw.get("securechat:ledger:publisher")  # the first one keeps publishing
        raw.close()
        assert "another server publishes" not in first.log_path.read_text()
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.slow
def test_a_redis_that_lost_its_data_never_unrevokes(tmp_path: Path, redis_server: Callable[..., object]) -> None:
    """Redis restarted without its data: chat2 keeps enforcing the last copy it read, and chat1 (the CA's
    machine) publishes the ledger again."""
    import redis as redis_py

    redis = redis_server(persistent=False)
    url = redis.url  # type: ignore[attr-defined]
    chat1 = Server(tmp_path / "chat1", "--redis", url)
    chat2 = None
    try:
        _chat2_certs(tmp_path / "chat1", tmp_path / "chat2")
        chat2 = Server(tmp_path / "chat2", "--redis", url)
        alice = Machine(tmp_path / "alice")
        assert alice.join(chat1, chat1.invite("alice")).returncode == 0
        assert chat1.cli("revoke", "alice").returncode == 0
        raw = redis_py.Redis.from_url(url, decode_responses=True)
        _until(lambda: bool(raw.smembers("securechat:ledger:revoked")), WITHIN)  # published,
        time.sleep(1.0)  # and read by chat2 (every 0.5 s)
        raw.close()
        redis.restart()  # type: ignore[attr-defined]  # SIGKILL, no AOF: everything in it is gone
        refused = alice.run("connect", "127.0.0.1", "--port", str(chat2.port), *_profile_files(alice))
        assert refused.returncode == 1 and "your certificate has been revoked" in refused.stderr
        raw = redis_py.Redis.from_url(url, decode_responses=True)
        _until(lambda: raw.get("securechat:ledger:version") is not None, 10)  # chat1 published it again
        raw.close()
    finally:
        chat1.stop()
        if chat2 is not None:
            chat2.stop()
