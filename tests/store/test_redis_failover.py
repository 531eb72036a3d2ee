"""No single point of failure: Redis behind Sentinel, its primary killed mid-conversation; a network cut.

Real ``securechat serve --redis redis+sentinel://...`` processes, real TLS line clients, a real primary,
replica and Sentinel (``tests/redis_server.py``) and a real relay that cuts the network
(``tests/netcut.py``). People talk at a steady pace on two servers while the primary dies by SIGKILL
(or the link to Redis is cut); every line must cross to the other server exactly once, in its
sender's order, in one order for everyone, under an id that is the one Redis keeps.
"""

from __future__ import annotations

import re
import signal
import ssl
import threading
import time
from collections.abc import Callable

import pytest

from securechat.wire.ids import room_key
from tests.conftest import LineClient, Proc
from tests.netcut import CutRelay
from tests.redis_server import MASTER, SentinelGroup
from tests.store.test_redis_cluster import _join, _resume

# Each speaker says a line every 20 ms (50 lines a second, a lively room) for LINES lines: 3 s, long
# enough for the outage (a second or two) to fall in the middle of it.
EVERY = 0.02
LINES = 150
FAST = ("--flood-rate", "0")  # the speakers are faster than a person: no flood control

_TAGGED = re.compile(r"@id=([0-9]+-[0-9]+);room=lobby (.*)\Z")


class Listener:
    """Reads one client's lines on a thread of its own, with the time each arrived."""

    def __init__(self, client: LineClient) -> None:
        self.client = client
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                line = self.client.readline(0.2)
            except TimeoutError:
                continue
            except (EOFError, OSError):
                return
            self.lines.append((time.monotonic(), line))

    def said(self, *speakers: str) -> list[tuple[float, str, str]]:
        """(arrival, id, text) of the speakers' lines, in arrival order."""
        out = []
        for at, line in list(self.lines):
            m = _TAGGED.match(line)
            if m and m[2].startswith(tuple(f"[{s}] " for s in speakers)):
                out.append((at, m[1], m[2]))
        return out

    def wait(self, predicate: Callable[[Listener], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                got = {text for _, _, text in self.said("ann", "bea")}
                missing = [f"{w} {i}" for w in ("ann", "bea") for i in range(LINES) if f"[{w}] {w} {i}" not in got]
                raise AssertionError(f"{len(missing)} lines never arrived: {missing[:20]}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def _speak(client: LineClient, who: str, said: list[float]) -> None:
    for i in range(LINES):
        client.send(f"{who} {i}")
        said.append(time.monotonic())
        time.sleep(EVERY)


def _conversation(a: Proc, b: Proc, ctx: ssl.SSLContext, fault: Callable[[], None]) -> dict:
    """ann (on A) and bea (on B) talk; lia (A) and lib (B) listen, tagged; ``fault()`` strikes after 40 lines."""
    ann, bea = _join(a.port, ctx, "ann"), _join(b.port, ctx, "bea")
    lia, lib = _join(a.port, ctx, "lia"), _join(b.port, ctx, "lib")
    tokens = {}
    for nick, client in (("lia", lia), ("lib", lib)):
        client.send("/session")
        tokens[nick] = client.expect("* session ").split()[2]
    lia.send("/who")
    assert lia.expect("* 4 online") == "* 4 online: ann, bea, lia, lib"
    listeners = {"lia": Listener(lia), "lib": Listener(lib)}
    said: dict[str, list[float]] = {"ann": [], "bea": []}
    speakers = [threading.Thread(target=_speak, args=(ann, "ann", said["ann"])),
                threading.Thread(target=_speak, args=(bea, "bea", said["bea"]))]
    for t in speakers:
        t.start()
    deadline = time.monotonic() + 10
    while len(said["ann"]) < 40:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    struck = time.monotonic()
    fault()
    for t in speakers:
        t.join()
    for listener in listeners.values():
        listener.wait(lambda li: len(li.said("ann", "bea")) >= 2 * LINES)
    time.sleep(0.5)  # a duplicate would arrive now
    for listener in listeners.values():
        listener.stop()
    return {"listeners": listeners, "said": said, "struck": struck, "tokens": tokens, "clients": (ann, bea, lia, lib)}


def _check_once_in_order(run: dict) -> list[tuple[str, str]]:
    """Every line once, each speaker's in order, one order on both servers; the (id, text) list."""
    orders = []
    for listener in run["listeners"].values():
        got = listener.said("ann", "bea")
        for who in ("ann", "bea"):
            assert [text for _, _, text in got if text.startswith(f"[{who}]")] == [
                f"[{who}] {who} {i}" for i in range(LINES)]
        ids = [i for _, i, _ in got]
        assert len(set(ids)) == len(ids)
        orders.append([(i, text) for _, i, text in got])
    assert orders[0] == orders[1]
    return orders[0]


def _quiet(run: dict, name: str, who: str) -> tuple[float, float]:
    """The longest wait between two of ``who``'s lines reaching ``name``, and when it began (after the fault)."""
    times = [at for at, _, text in run["listeners"][name].said(who) if text.startswith(f"[{who}]")]
    gaps = [(b - a, a - run["struck"]) for a, b in zip(times, times[1:], strict=False)]
    return max(gaps)


@pytest.mark.slow
def test_a_primary_killed_mid_conversation_every_line_crosses_once_in_order(redis_sentinel, serve_proc,
                                                                           client_ctx) -> None:
    group: SentinelGroup = redis_sentinel()
    a = serve_proc("--redis", group.url, *FAST)
    b = serve_proc("--redis", group.url, *FAST)
    promoted: list[float] = []

    def kill_primary() -> None:
        group.primary.stop(signal.SIGKILL)
        threading.Thread(target=lambda: promoted.append(group.wait_failover()), daemon=True).start()

    run = _conversation(a, b, client_ctx, kill_primary)
    order = _check_once_in_order(run)
    # The ids everyone saw are the new primary's: history, /resume and read positions mean the same.
    import redis

    new_primary = redis.Redis(port=group.replica.port, decode_responses=True)
    assert new_primary.info("replication")["role"] == "master"
    stored = [(i, f"[{f['s']}] {f['t']}") for i, f in new_primary.xrange(f"securechat:room:{room_key('lobby')}")
              if f["k"] == "chat"]
    new_primary.close()
    assert stored == order
    # How long the crossing lines stopped (the README's failover timeline).
    gap, began = _quiet(run, "lib", "ann")
    print(f"\nprimary killed at +0.00 s; replica promoted at +{promoted[0] - run['struck']:.2f} s; "
          f"ann's lines stopped reaching B at {began:+.2f} s for {gap:.2f} s")
    assert gap < 10
    # After the failover: a new nick is claimed, and a client that moves server resumes exactly.
    ann, bea, lia, lib = run["clients"]
    last = run["listeners"]["lia"].said("ann", "bea")[-1][1]
    lia.close()
    ann.send("said while lia moves")
    back = _resume(b.port, client_ctx, run["tokens"]["lia"], f"lobby={last}")
    assert back.expect("* welcome").startswith("* welcome, lia! (resumed)")
    spoken = [re.sub(r"^@id=[0-9-]+;room=lobby ", "", line) for line in back.lines_until_quiet(1.0)
              if "[ann]" in line or "[bea]" in line]
    assert len(spoken) == 1 and re.fullmatch(r"(\(missed \d\d:\d\d\) )?\[ann\] said while lia moves", spoken[0])
    newbie = _join(a.port, client_ctx, "newbie")
    newbie.send("/who")
    assert newbie.expect("* 5 online") == "* 5 online: ann, bea, lia, lib, newbie"


@pytest.mark.slow
def test_a_network_cut_mid_conversation_loses_nothing_repeats_nothing_and_grants_no_nick(redis_server, serve_proc,
                                                                                        client_ctx) -> None:
    redis = redis_server()
    relay = CutRelay(redis.port)
    try:
        a = serve_proc("--redis", relay.url, *FAST)
        b = serve_proc("--redis", relay.url, *FAST)
        refusals: list[tuple[str, float]] = []

        def cut_then_heal() -> None:
            # Requests still reach Redis (and are carried out) but no answer comes back: every batch in
            # flight is written, its writer never hears so, and sends it again once healed.
            relay.cut(replies_only=True)
            started = time.monotonic()
            carol = _join_or_refused(a.port, client_ctx, "carol")
            refusals.append((carol, time.monotonic() - started))
            time.sleep(max(0.0, 1.5 - (time.monotonic() - started)))
            relay.heal()

        run = _conversation(a, b, client_ctx, cut_then_heal)
        _check_once_in_order(run)
        # While Redis could not be asked, a new nick was refused in one clear line (never granted twice).
        assert refusals[0][0] == ("* nickname refused: cannot check 'carol' with the chat's other servers right now "
                                  "(their shared store is unreachable); try again in a moment; send another")
        assert refusals[0][1] < 5
        # Healed: granted once, as soon as A has given back the claim Redis carried out without telling it.
        deadline = time.monotonic() + 10
        while (answer := _join_or_refused(b.port, client_ctx, "carol")).startswith("* nickname refused"):
            assert answer == "* nickname refused: 'carol' is taken; send another" and time.monotonic() < deadline
            time.sleep(0.2)
        assert answer.startswith("* welcome, carol! 5 online: ann, bea, carol, lia, lib.")
        for served in (a, b):  # while they still reach Redis: a stopping server flushes what it has
            served.proc.send_signal(signal.SIGTERM)
            served.proc.wait(15)
    finally:
        relay.close()


def _join_or_refused(port: int, ctx: ssl.SSLContext, nick: str) -> str:
    import socket

    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    client = LineClient(ctx.wrap_socket(raw, server_hostname="localhost"))
    client.expect("* securechat")
    client.send(nick)
    answer = client.expect(lambda line: line.startswith(("* welcome", "* nickname refused")))
    client.close()
    return answer


def test_servers_share_a_chat_through_sentinel_over_tls_with_a_password(redis_sentinel, serve_proc,
                                                                       client_ctx) -> None:
    import trustme

    redis_ca = trustme.CA()
    group: SentinelGroup = redis_sentinel(password="s3cret", tls=redis_ca.issue_cert("127.0.0.1"), ca=redis_ca)
    assert group.url.startswith("rediss+sentinel://:s3cret@")
    a = serve_proc("--redis", group.url, "--redis-ca", str(group.primary.ca_file))
    b = serve_proc("--redis", group.url, "--redis-ca", str(group.primary.ca_file))
    alice = _join(a.port, client_ctx, "alice")
    bob = _join(b.port, client_ctx, "bob")
    alice.expect("* bob joined")
    bob.send("through Sentinel, over TLS")
    assert alice.expect("[bob]") == "[bob] through Sentinel, over TLS"
    # The wrong password: one line, the password never shown.
    served = serve_proc("--redis", group.url.replace("s3cret", "wrong"), "--redis-ca", str(group.primary.ca_file),
                        ready=False)
    out, err = served.proc.communicate(timeout=30)
    assert served.proc.returncode == 1 and err.count("\n") == 1 and "wrong" not in err and "s3cret" not in err
    assert err.startswith(f"securechat serve: cannot use Redis through the Sentinels at rediss+sentinel://:***@"
                          f"127.0.0.1:{group.port}/{MASTER}: no Sentinel names a primary for '{MASTER}' "
                          f"(127.0.0.1:{group.port}: Redis refused the password in the URL)")


@pytest.mark.parametrize("what", ["no sentinel", "unknown group"])
def test_a_sentinel_url_that_leads_nowhere_is_one_line_at_start(redis_sentinel, serve_proc, what: str) -> None:
    if what == "no sentinel":
        url = "redis+sentinel://127.0.0.1:1/chat"
        heard = "127.0.0.1:1: Error 111 connecting to 127.0.0.1:1. Connection refused."
    else:
        group: SentinelGroup = redis_sentinel()
        url = f"redis+sentinel://127.0.0.1:{group.port}/nosuch"
        heard = f"127.0.0.1:{group.port} knows no group named 'nosuch'"
    served = serve_proc("--redis", url, ready=False)
    out, err = served.proc.communicate(timeout=30)
    assert served.proc.returncode == 1
    name = url.rsplit("/", 1)[1]
    assert err == f"securechat serve: cannot use Redis through the Sentinels at {url}: no Sentinel names a primary " \
                  f"for '{name}' ({heard})\n"
    assert "Traceback" not in out + err
