"""Finding the server on the LAN, end to end, on a LAN of the test's own (tests/netns.py).

A real ``securechat serve`` in the "server" namespace announces itself with mDNS; ``securechat servers``,
``join CODE`` and ``connect`` run in the "client" namespace, joined to it by a veth pair. Multicast
never leaves those namespaces; everywhere else the suite switches discovery off (tests/conftest.py),
and the last tests here check that nothing outside a namespace opens the mDNS port.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from securechat.wire import dnssd
from tests import netns
from tests.netns import SECURECHAT, Lan

pytestmark = pytest.mark.skipif(netns.unavailable() is not None, reason=netns.unavailable() or "")


@pytest.fixture
def lan() -> Iterator[Lan]:
    try:
        made = Lan()
    except OSError as exc:
        pytest.skip(f"cannot make network namespaces here: {exc}")
    yield made
    made.close()


class Served:
    """``securechat serve`` in the server namespace, in ``home`` (it mints certs/ there)."""

    def __init__(self, lan: Lan, home: Path, *args: str, discovery: bool = True, announced: bool = True) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.process = lan.start(lan.server, [*SECURECHAT, "serve", "--port", "0", "--no-history", *args],
                                 cwd=home, environment=netns.env(discovery=discovery),
                                 log=home / f"serve-{time.monotonic_ns()}.log")
        pin = self.process.wait_out("[SERVER] CA SHA-256 fingerprint (for --pin): ")
        self.ca = pin.rsplit(" ", 1)[1]
        waiting = self.process.wait_out("[SERVER] Waiting for connections on ")
        self.port = int(waiting.rsplit(":", 1)[1])
        self.where = f"{Lan.SERVER_IP}:{self.port}"
        if announced:
            self.name = self.process.wait_out("[SERVER] Announced on the LAN as ").split("'")[1]

    def invite(self, name: str) -> str:
        """A code for ``name`` (the ledger is a file: the command needs no network)."""
        done = subprocess.run([*SECURECHAT, "invite", name], cwd=self.home, capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        match = re.search(r"securechat join \S+ (\S+)", done.stdout)
        assert match, done.stdout
        return match.group(1)


class Client:
    """Commands in the client namespace, with a configuration directory of their own."""

    def __init__(self, lan: Lan, root: Path) -> None:
        self.lan = lan
        self.root = root
        self.config = root / "config"
        root.mkdir(parents=True, exist_ok=True)

    def run(self, *args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.lan.argv(self.lan.client, *SECURECHAT, *args), cwd=self.root, input=stdin,
                              capture_output=True, text=True, timeout=timeout, env=netns.env(self.config),
                              check=False)

    @property
    def profiles(self) -> list[Path]:
        return [p for p in (self.config / "securechat" / "servers").glob("*/profile.json")]


@pytest.mark.slow
def test_servers_lists_the_server_and_drops_it_when_it_stops(lan: Lan, tmp_path: Path) -> None:
    served = Served(lan, tmp_path / "server")
    client = Client(lan, tmp_path / "client")
    listed = client.run("servers")
    assert listed.returncode == 0 and listed.stderr == "", listed
    row = next(line for line in listed.stdout.splitlines() if served.where in line)
    assert row.split()[0] == served.name
    assert dnssd.short_fingerprint(served.ca) in row  # the CA's, as the server printed it
    assert "takes invites" in row and row.endswith(f"securechat connect {served.where}")
    assert "compare it with the server's '[SERVER] CA SHA-256 fingerprint' line" in listed.stdout

    # A search under way when the server stops: its goodbye takes it off the list at once (without it,
    # the records would live on for their TTL, two minutes).
    watching = subprocess.Popen(lan.argv(lan.client, *SECURECHAT, "servers", "--timeout", "6"), cwd=client.root,
                                env=netns.env(client.config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    time.sleep(2)
    assert served.process.stop() == 0
    served.process.wait_out("[SERVER] Stopped")
    out, err = watching.communicate(timeout=30)
    assert (watching.returncode, out, err) == (0, "no securechat server found on this network\n", "")
    again = client.run("servers", "--timeout", "1")
    assert (again.returncode, again.stdout) == (0, "no securechat server found on this network\n")


@pytest.mark.slow
def test_join_with_the_code_alone_then_connect_with_no_address(lan: Lan, tmp_path: Path) -> None:
    served = Served(lan, tmp_path / "server")
    code = served.invite("alice")
    alice = Client(lan, tmp_path / "alice")
    joined = alice.run("join", code)
    assert joined.returncode == 0, joined.stderr
    assert f"Found '{served.name}' at {served.where} on this network" in joined.stdout
    assert f"Joined {Lan.SERVER_IP} as alice." in joined.stdout
    assert len(alice.profiles) == 1

    listed = alice.run("servers")
    assert f"joined {served.where}" in listed.stdout, listed.stdout

    chat = alice.run("connect", stdin="/who\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stderr.startswith(f"securechat connect: found '{served.name}' at {served.where} on this network "
                                  "(you joined it)\n"), chat.stderr
    assert "* welcome, alice!" in chat.stdout
    served.process.wait_out(f"[NEW CLIENT] Connected from ('{Lan.CLIENT_IP}'")

    # The seed's menu offers what it found before its prompt, whose words stay the seed's.
    menu = alice.run(stdin="2\n1\n/who\n")
    assert menu.returncode == 0, menu.stderr
    assert menu.stdout.startswith("Select mode:\n1. Server\n2. Client\nOption: Looking for securechat servers on "
                                  "this network...\nFound (type a number, or an address):\n"
                                  f"  1. {served.name}  {served.where}  CA {dnssd.short_fingerprint(served.ca)}  "
                                  f"(joined {served.where}, takes invites)\nEnter server IP: "), menu.stdout
    assert "* welcome, alice!" in menu.stdout
    assert served.process.stop() == 0


@pytest.mark.slow
def test_a_spoofed_announcement_fails_loudly(lan: Lan, tmp_path: Path) -> None:
    """A rogue in the client's namespace announces the real server's fingerprint and relays to it: the
    join fails at the PAKE (the server sees the relay's certificate in the joiner's MAC), connect fails
    at TLS verification, and nothing is saved or let in."""
    served = Served(lan, tmp_path / "server", "--no-announce", announced=False)
    rogue = lan.start(lan.client, [sys.executable, "-m", "tests.dnssd_rogue", "--listen", Lan.CLIENT_IP, "--target",
                                   served.where, "--ca", served.ca, "--name", "chat-server"],
                      cwd=tmp_path, environment=netns.env(), log=tmp_path / "rogue.log")
    rogue_port = int(rogue.wait_out("READY ").split()[1])
    alice = Client(lan, tmp_path / "alice")
    listed = alice.run("servers")
    assert f"{Lan.CLIENT_IP}:{rogue_port}" in listed.stdout  # announcing is free: it is only a hint
    assert served.where not in listed.stdout

    code = served.invite("alice")
    joined = alice.run("join", code)
    assert joined.returncode == 1
    assert joined.stdout.startswith(f"Found 'chat-server' at {Lan.CLIENT_IP}:{rogue_port} on this network")
    (line,) = joined.stderr.splitlines()
    assert line.startswith("securechat join: ") and "intercepting the connection" in line, line
    assert "Nothing was saved" in line and alice.profiles == []
    deadline = time.monotonic() + 10
    while "someone in the middle is intercepting" not in served.process.stderr:
        assert time.monotonic() < deadline, served.process.stderr
        time.sleep(0.1)

    # With the real address the same code still works (the relay cost it one try), and then a
    # connect with no address picks the rogue (it announces the CA alice knows) and refuses it.
    direct = alice.run("join", Lan.SERVER_IP, code, "--port", str(served.port))
    assert direct.returncode == 0, direct.stderr
    chat = alice.run("connect", stdin="my secret line\n")
    assert chat.returncode == 1
    lines = chat.stderr.splitlines()
    assert lines[0] == f"securechat connect: found 'chat-server' at {Lan.CLIENT_IP}:{rogue_port} on this network " \
                       "(you joined it)"
    assert len(lines) == 2 and lines[1].startswith("securechat connect: ") and "Traceback" not in chat.stderr
    assert "certificate" in lines[1], lines[1]
    assert "welcome" not in chat.stdout


@pytest.mark.slow
def test_two_servers_answering_for_one_invite_spend_nothing(lan: Lan, tmp_path: Path) -> None:
    """The real server and a rogue both answer for the code: join says so and stops before the
    confirmation, so the invite keeps all its tries; the real address then joins at the first try."""
    served = Served(lan, tmp_path / "server")
    rogue = lan.start(lan.client, [sys.executable, "-m", "tests.dnssd_rogue", "--listen", Lan.CLIENT_IP, "--target",
                                   served.where, "--ca", served.ca],
                      cwd=tmp_path, environment=netns.env(), log=tmp_path / "rogue.log")
    rogue.wait_out("READY ")
    code = served.invite("alice")
    alice = Client(lan, tmp_path / "alice")
    joined = alice.run("join", code)
    assert joined.returncode == 1
    (line,) = joined.stderr.splitlines()
    assert "2 servers on this network answer for invite" in line and "nothing was spent" in line, line
    assert served.where in line and Lan.CLIENT_IP in line
    tries = subprocess.run([*SECURECHAT, "invite", "--list"], cwd=served.home, capture_output=True, text=True,
                           timeout=30, check=False)
    assert re.search(r"\balice +1 +0/3 ", tries.stdout), tries.stdout  # no wrong try counted
    direct = alice.run("join", Lan.SERVER_IP, code, "--port", str(served.port))
    assert direct.returncode == 0, direct.stderr


# -- never outside a namespace, never on loopback -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("args, discovery, announces", [
    ((), True, True),  # the control: the check below does see an announcing server's socket
    (("--listen", "127.0.0.1"), True, False),
    (("--no-announce",), True, False),
    ((), False, False),  # the suite's switch
])
def test_who_opens_the_mdns_port(lan: Lan, tmp_path: Path, args: tuple[str, ...], discovery: bool,
                                 announces: bool) -> None:
    served = Served(lan, tmp_path / "server", *args, discovery=discovery, announced=announces)
    if not announces:
        time.sleep(2.5)  # longer than an announcement takes to start (~2 s)
    opened = netns.mdns_sockets(served.process.proc.pid)
    assert opened > 0 if announces else opened == 0  # zeroconf: one to listen, one to send per interface
    assert not any("Announced" in line for line in served.process.lines) or announces
    assert served.process.stop() == 0
    assert "Traceback" not in served.process.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["no multicast route", "no zeroconf package"])
def test_a_broken_multicast_setup_is_one_line_and_the_server_serves(lan: Lan, tmp_path: Path, how: str) -> None:
    if how == "no multicast route":
        subprocess.run(["ip", "-n", lan.server, "link", "set", "lan0", "down"], check=True, timeout=10)
        argv = [*SECURECHAT, "serve"]
        words = "network is unreachable"
    else:
        argv = [sys.executable, "-c", "import sys; sys.modules['zeroconf'] = None; from securechat.cli import main; "
                "sys.exit(main(sys.argv[1:]))", "serve"]
        words = "the zeroconf package is not installed"
    home = tmp_path / "server"
    home.mkdir()
    proc = lan.start(lan.server, [*argv, "--port", "0", "--no-history", "--listen", Lan.SERVER_IP], cwd=home,
                     environment=netns.env(), log=home / "serve.log")
    proc.wait_out("[SERVER] Waiting for connections on ")
    deadline = time.monotonic() + 10
    while words not in proc.stderr:
        assert time.monotonic() < deadline, proc.stderr
        time.sleep(0.1)
    time.sleep(1)
    assert proc.proc.poll() is None  # still serving
    assert proc.stop() == 0
    (line,) = proc.stderr.splitlines()
    assert line.startswith("[SERVER] WARNING: cannot announce this server on the LAN (mDNS): ") and words in line
