"""Never a traceback, for every option and every file (issue 10, item 4; issue 11's one error convention).

The rule (securechat.wire.options): a bad command line exits 2, any other failure exits 1, and stderr is
ONE line starting with the program that speaks (``securechat serve: ``, ``securechat connect: ``,
``securechat gen-certs: ``, ``securechat fingerprint: ``, or ``securechat: `` for the dispatcher);
argparse's multi-line usage is not printed (``--help`` shows it).

The walk below introspects every subcommand's argparse parser, so an option added later is walked
too, and runs each bad value in a real ``python -m securechat`` process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from securechat import cli
from securechat.pki import certs
from securechat.server.engine import ChatServer
from securechat.wire import dnssd, options
from tests import netns
from tests.conftest import LineClient

LOOPBACK = "127.0.0.1"
SECURECHAT = [sys.executable, "-m", "securechat"]

# Values no number-typed option may accept; each must be a usage error (exit 2).
BAD_NUMBERS = ["", " ", "abc", "nan", "inf", "-inf", "-1", "1e999", "9" * 40, "0x10", "1,5"]
# Hosts judged without the network (no DNS query ever leaves the machine in a test).
BAD_HOSTS = ["", " ", "999.1.1.1", "1.2.3", "256.256.256.256", "1.2.3.4.5", "a\x01b"]
BAD_CHOICES = ["", "bogus", "1.1"]
# For options the walk knows nothing about: nothing reasonable accepts these.
BAD_STRINGS: list[str | bytes] = ["", "\x01", b"\xff\xfe"]

# Types that validate at parse time: a bad value is a usage error, never a runtime one.
VALIDATING_TYPES = {"port", "duration", "count", "rate", "host"}


@dataclass(frozen=True)
class Case:
    command: str
    option: str  # "--port", or the positional's dest
    argv: tuple[str | bytes, ...]
    must_be_usage: bool


@pytest.fixture(scope="module")
def walk_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A working directory with a minted certs/, some hostile files, and a port that is in use."""
    root = tmp_path_factory.mktemp("walk")
    certs.mint(root / "certs", clients=["alice"])
    garbage = root / "garbage.pem"
    garbage.write_bytes(b"\xff\xfe-----BEGIN CERTIFICATE-----\n\xff\x00\n-----END CERTIFICATE-----\n"
                        b"-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    (root / "a-directory").mkdir()
    (root / "a-file").write_text("not a directory\n")
    yield {"root": root, "garbage": garbage}


def _type_name(action: argparse.Action) -> str:
    return getattr(action.type, "__name__", "") if action.type is not None else ""


def _parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for command, (module_name, _) in cli.COMMANDS.items():
        yield command, importlib.import_module(module_name).build_parser()


def _bad_paths(root: Path, output_dir: bool) -> list[str | bytes]:
    if output_dir:  # somewhere gen-certs cannot make a directory of keys
        return ["", str(root / "a-file"), "/dev/null", "/proc/securechat-walk/certs"]
    return ["", str(root / "missing.pem"), str(root / "a-directory"), "/dev/null", str(root / "garbage.pem"),
            os.fsencode(root) + b"/\xff\xfe-not-utf8.pem"]


def _values(action: argparse.Action, root: Path) -> tuple[list[str | bytes], bool]:
    """Bad values for ``action`` and whether each must be a usage error (exit 2)."""
    name = _type_name(action)
    if action.choices is not None:
        return list(BAD_CHOICES), True
    if name == "host" or (action.dest in ("host", "ip") and action.type is not None):
        return list(BAD_HOSTS), True
    if name in VALIDATING_TYPES:
        return list(BAD_NUMBERS), True
    if name == "path":
        return [*_bad_paths(root, output_dir=action.metavar == "DIR")], False
    if action.dest == "days":
        return list(BAD_NUMBERS), True
    return list(BAD_STRINGS), False


def _cases(root: Path, busy_port: int, closed_port: int) -> list[Case]:
    client = root / "certs" / "client-alice.pem"
    base: dict[str, list[str]] = {
        # A port in use: should a bad value ever be accepted, serve fails to listen instead of running.
        "serve": ["--host", LOOPBACK, "--port", str(busy_port)],
        # Nothing listens there: should a bad value be accepted, the connection is refused at once.
        "connect": ["--port", str(closed_port), "--timeout", "5", "--nick", "walker"],
        "gen-certs": ["--out", str(root / "walk-out")],
        "fingerprint": [],
        # Invites: nothing listens at closed_port, and the walk's certs/ has a CA (and a registry to make).
        "invite": ["--certs", str(root / "certs"), "--host", LOOPBACK],
        "join": ["--port", str(closed_port), "--timeout", "5"],
        "revoke": ["--certs", str(root / "certs")],
        "certs": ["--certs", str(root / "certs")],
        "servers": [],  # the suite switches discovery off: a value that were accepted fails in one line
    }
    needs = {("serve", "--ca"): ["--require-client-cert"], ("connect", "--key"): ["--cert", str(client)]}
    cases: list[Case] = []
    for command, parser in _parsers():
        positionals = [a for a in parser._actions if not a.option_strings]
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.nargs == 0:
                continue
            values, usage = _values(action, root)
            option = action.option_strings[-1] if action.option_strings else action.dest
            for value in values:
                if action.option_strings:
                    given: list[str | bytes] = [*base[command], *needs.get((command, option), []), option, value]
                    pos: list[str | bytes] = [LOOPBACK if p.dest == "host" else str(root / "certs" / "ca.pem")
                                              for p in positionals]
                else:
                    given = list(base[command])
                    pos = [value if p is action else (LOOPBACK if p.dest == "host" else
                                                      str(root / "certs" / "ca.pem")) for p in positionals]
                cases.append(Case(command, option, (command, *pos, *given), usage))
    return cases


def _run(argv: tuple[str | bytes, ...], cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SECURECHAT, *argv], cwd=cwd, capture_output=True, text=True, errors="replace",
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def _problem(case: Case, result: subprocess.CompletedProcess[str]) -> str | None:
    prog = f"securechat {case.command}: "
    allowed = (2,) if case.must_be_usage else (1, 2)
    if "Traceback" in result.stderr:
        return "traceback"
    if result.returncode not in allowed:
        return f"exit {result.returncode}, expected {allowed}"
    if result.stderr.count("\n") != 1 or not result.stderr.endswith("\n"):
        return "not exactly one line on stderr"
    if not result.stderr.startswith(prog):
        return f"does not start with {prog!r}"
    return None


def test_no_option_is_typed_as_a_bare_int_or_float() -> None:
    """Numbers go through securechat.wire.options, which refuses nan, inf, negatives and out-of-range values."""
    for command, parser in _parsers():
        for action in parser._actions:
            assert action.type not in (int, float), f"{command} {action.option_strings}: use securechat.wire.options"


@pytest.mark.slow
def test_every_option_of_every_subcommand_with_bad_values(walk_dir: dict[str, Path]) -> None:
    root = walk_dir["root"]
    with socket.socket() as busy, socket.socket() as closed:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        closed.bind((LOOPBACK, 0))  # bound, never listening: connections to it are refused
        cases = _cases(root, busy.getsockname()[1], closed.getsockname()[1])
        walked = {(c.command, c.option) for c in cases}
        # The walk reached every subcommand and the options the issue names.
        for expected in [("serve", "--port"), ("serve", "--host"), ("serve", "--handshake-timeout"),
                         ("serve", "--login-timeout"), ("serve", "--max-clients"), ("serve", "--cert"),
                         ("connect", "--timeout"), ("connect", "--port"), ("connect", "host"),
                         ("gen-certs", "--out"), ("fingerprint", "files")]:
            assert expected in walked, expected
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda c: (c, _run(c.argv, root)), cases))
    failures = [(case.argv, problem, result.returncode, result.stderr[:300])
                for case, result in results if (problem := _problem(case, result)) is not None]
    assert failures == [], f"{len(failures)} of {len(cases)} cases: {failures[:5]}"
    assert not (root / "walk-out").exists(), "gen-certs accepted a bad value and wrote certificates"


@pytest.mark.parametrize("argv, words", [
    (["serve", "--port", "70000"], "70000 is not a TCP port"),
    (["serve", "--host", "999.1.1.1"], "999.1.1.1 is not an IPv4 address: it has four numbers from 0 to 255"),
    (["serve", "--handshake-timeout", "nan"], "'nan' is not a finite number"),
    (["serve", "--login-timeout", "1e12"], "out of range: seconds, more than 0 and at most 3600"),
    (["serve", "--handshake-timeout", "-5"], "out of range"),
    (["serve", "--max-clients", "0"], "0 is out of range: a whole number from 1"),
    (["connect", "127.0.0.1", "--timeout", "-1"], "-1 is out of range"),
    (["connect", "127.0.0.1", "--port", "99999"], "99999 is not a TCP port: a TCP port is 1-65535"),
    (["gen-certs", "--out", ""], "an empty path"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_the_issues_examples_say_what_is_wrong(tmp_path: Path, argv: list[str], words: str) -> None:
    result = _run(tuple(argv), tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
    prog = "securechat: " if argv[0] == "frobnicate" else f"securechat {argv[0]}: "
    assert result.stderr.startswith(prog)
    assert not (tmp_path / "certs").exists()


@pytest.mark.parametrize("layout, words", [
    ("ca.pem only", "that is a client's copy of the CA"),
    ("server.key only", "incomplete set (server.key; no server.pem)"),
    ("ca.key only", "incomplete set (ca.key; no server.pem)"),
    ("certs is a file", "certs is a file, not a directory"),
    ("server.pem is a directory", "certificate file is not a file: certs/server.pem"),
])
def test_serve_with_odd_certs_directories(tmp_path: Path, layout: str, words: str) -> None:
    source = tmp_path / "source"
    certs.mint(source)
    target = tmp_path / "certs"
    if layout == "certs is a file":
        target.write_text("oops\n")
    else:
        target.mkdir(mode=0o700)
        if layout == "server.pem is a directory":
            (target / "server.pem").mkdir()
        else:
            name = layout.split()[0]
            (target / name).write_bytes((source / name).read_bytes())
            (target / name).chmod(0o600)
    result = _run(("serve", "--host", LOOPBACK, "--port", "0"), tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("securechat serve: "), result.stderr
    assert words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -- stdout that goes away ---------------------------------------------------------------------------


def _client_joins(port: int, ca: Path) -> None:
    from securechat.wire import tls

    raw = socket.create_connection((LOOPBACK, port), timeout=10)
    client = LineClient(tls.client_context(ca).wrap_socket(raw, server_hostname="localhost"))
    client.expect("* securechat")
    client.send("walker")
    client.expect("* welcome, walker!")
    client.close()


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("stdout", ["/dev/full", "closed pipe"])
def test_serve_without_a_working_stdout_keeps_serving_and_exits_cleanly(tmp_path: Path, stdout: str) -> None:
    """`serve > /dev/full` and a stdout pipe nobody reads: one line on stderr, chat works, SIGTERM exits 0."""
    port = _free_port()
    argv = [*SECURECHAT, "serve", "--host", LOOPBACK, "--port", str(port)]
    if stdout == "/dev/full":
        with open("/dev/full", "w") as full:
            proc = subprocess.Popen(argv, cwd=tmp_path, stdout=full, stderr=subprocess.PIPE, text=True)
    else:
        read_end, write_end = os.pipe()
        os.close(read_end)  # every write to stdout gets EPIPE
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=write_end, stderr=subprocess.PIPE, text=True)
        os.close(write_end)
    try:
        _wait_port(port)
        _client_joins(port, tmp_path / "certs" / "ca.pem")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    why = "no space left on device" if stdout == "/dev/full" else "broken pipe"
    assert err == f"securechat serve: cannot write to standard output ({why}); carrying on without it\n"


def test_serve_piped_into_head_exits_cleanly_at_shutdown(tmp_path: Path) -> None:
    """`securechat serve | head -1`: head leaves after one line; shutdown later must not trace back."""
    port = _free_port()
    proc = subprocess.Popen([*SECURECHAT, "serve", "--host", LOOPBACK, "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # what head -1 prints
    _wait_port(port)
    proc.stdout.close()  # head exits
    _client_joins(port, tmp_path / "certs" / "ca.pem")  # a [NEW CLIENT] line now goes nowhere
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert proc.wait(timeout=30) == 0, err
    assert first.startswith("[SERVER]")
    assert "Traceback" not in err and "Exception ignored" not in err
    assert err in ("", "securechat serve: cannot write to standard output (broken pipe); carrying on without it\n")


@pytest.mark.parametrize("argv", [["gen-certs", "--out", "certs"], ["fingerprint", "certs/ca.pem"],
                                  ["serve", "--help"], ["--help"]])
def test_one_shot_commands_with_stdout_on_a_full_disk_fail_in_one_line(tmp_path: Path, argv: list[str]) -> None:
    if argv[0] == "fingerprint":
        certs.mint(tmp_path / "certs")
    with open("/dev/full", "w") as full:
        result = subprocess.run([*SECURECHAT, *argv], cwd=tmp_path, stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "cannot write to standard output (no space left on device)" in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_the_error_convention_is_documented_in_one_place() -> None:
    assert options.error_line("securechat serve", "a\nb") == "securechat serve: a b"


@pytest.mark.parametrize("stdout", ["/dev/full", "closed pipe"])
def test_line_mode_client_without_a_working_stdout_still_chats(
        serve: Callable[..., ChatServer], connect: Callable[..., LineClient], cert_files: dict[str, Path],
        stdout: str) -> None:
    """`connect ... > /dev/full`: the nickname prompt cannot be written; one line, and the chat goes on."""
    server = serve()
    port = server.address[1]
    bob = connect(server)
    bob.send("bob")
    bob.expect("* welcome, bob!")
    argv = [*SECURECHAT, "connect", LOOPBACK, "--port", str(port), "--ca", str(cert_files["ca"])]
    if stdout == "/dev/full":
        out: int = os.open("/dev/full", os.O_WRONLY)
    else:
        read_end, out = os.pipe()
        os.close(read_end)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(out)
    assert proc.stdin is not None
    proc.stdin.write("alice\nhello from alice\n")
    proc.stdin.flush()
    bob.expect("[alice] hello from alice")
    _, err = proc.communicate("", timeout=30)
    assert proc.returncode == 0, err
    why = "no space left on device" if stdout == "/dev/full" else "broken pipe"
    assert err == f"securechat connect: cannot write to standard output ({why}); carrying on without it\n"


def test_a_name_lookup_failure_is_described_in_words() -> None:
    """`serve --host` with a name that does not resolve said "unknown error -2" (os.strerror of EAI_NONAME)."""
    from securechat.wire.conn import describe_error

    text = describe_error(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert text == "no such host name or address (Name or service not known)"


# -- every command's output going away (issue 18, bug 3) ---------------------------------------------
#
# The walk above covers every option of every subcommand; this one covers every subcommand's output:
# each is run for real with stdout on a full disk and on a pipe whose reader has left. A subcommand
# added to cli.COMMANDS without an entry in OUTPUT_RUNS fails test_every_subcommand_has_an_output_run.

BROKEN_STDOUTS = ["/dev/full", "closed pipe"]
WHY = {"/dev/full": "no space left on device", "closed pipe": "broken pipe"}


@dataclass
class Served:
    """A real `securechat serve` (the CA, invites) with a client certificate issued and registered."""

    home: Path
    port: int
    ca: Path
    proc: subprocess.Popen[str]
    names: Iterator[int]

    def cli(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SECURECHAT, *argv], cwd=self.home, capture_output=True, text=True, timeout=60,
                              env=env, check=False, stdin=subprocess.DEVNULL)

    def code(self) -> str:
        done = self.cli("invite", f"walker{next(self.names)}")
        assert done.returncode == 0, done.stderr
        return done.stdout.split()[-1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    import itertools

    home = tmp_path_factory.mktemp("served")
    port = _free_port()
    proc = subprocess.Popen([*SECURECHAT, "serve", "--listen", LOOPBACK, "--port", str(port)], cwd=home,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        _wait_port(port)
        deadline = time.monotonic() + 30
        while not list((home / "certs").glob("serving-*.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield Served(home, port, home / "certs" / "ca.pem", proc, itertools.count())
    finally:
        proc.terminate()
        proc.wait(30)


def _broken(argv: list[str], stdout: str, *, cwd: Path, env: dict[str, str] | None = None,
            stdin: str = "", signal_after: Callable[[], None] | None = None,
            prefix: list[str] = SECURECHAT) -> tuple[int, str]:
    """Run ``securechat ARGV`` with stdout on /dev/full or a pipe nobody reads; (status, stderr)."""
    if stdout == "/dev/full":
        out = os.open("/dev/full", os.O_WRONLY)
    else:
        read_end, out = os.pipe()
        os.close(read_end)  # every write gets EPIPE
    try:
        proc = subprocess.Popen([*prefix, *argv], cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.PIPE, text=True)
    finally:
        os.close(out)
    if signal_after is not None:
        signal_after()
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(stdin, timeout=60)
    return proc.returncode, err


def _config(root: Path) -> dict[str, str]:
    return {**os.environ, "XDG_CONFIG_HOME": str(root / f"config-{time.monotonic_ns()}")}


def _run_serve(srv: Served, stdout: str, root: Path) -> tuple[int, str, str]:
    port = _free_port()
    home = root / f"serve-{time.monotonic_ns()}"
    home.mkdir()
    def running() -> None:  # its record is written once the signal handlers are in place
        _wait_port(port)
        deadline = time.monotonic() + 30
        while not (home / "certs" / f"serving-{port}.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    status, err = _broken(["serve", "--listen", LOOPBACK, "--port", str(port)], stdout, cwd=home,
                          signal_after=running)
    return status, err, "carrying on without it"


def _run_connect(srv: Served, stdout: str, root: Path) -> tuple[int, str, str]:
    status, err = _broken(["connect", f"{LOOPBACK}:{srv.port}", "--ca", str(srv.ca), "--nick", "piper"], stdout,
                          cwd=root, env=_config(root), stdin="hello\n")
    return status, err, "carrying on without it"


def _run_join(srv: Served, stdout: str, root: Path) -> tuple[int, str, str]:
    status, err = _broken(["join", LOOPBACK, srv.code(), "--port", str(srv.port)], stdout, cwd=root,
                          env=_config(root))
    return status, err, f"joined all the same (the profile is saved), from now on: securechat connect " \
                        f"{LOOPBACK}:{srv.port}"


def _run_revoke(srv: Served, stdout: str, root: Path) -> tuple[int, str, str]:
    name = f"victim{next(srv.names)}"
    assert srv.cli("gen-certs", "--client", name).returncode == 0
    status, err = _broken(["revoke", name], stdout, cwd=srv.home)
    return status, err, f"revoked all the same: {name} (serial "


def _run_invite(srv: Served, stdout: str, root: Path) -> tuple[int, str, str]:
    status, err = _broken(["invite", f"guest{next(srv.names)}"], stdout, cwd=srv.home)
    return status, err, "cancelled, since nobody saw its code"


def _run_servers(srv: Served, stdout: str, root: Path) -> tuple[int, str, str]:
    # Searching for real means multicast, which may only happen on a network of the test's own.
    why = netns.unavailable()
    if why is not None:
        pytest.skip(why)
    lan = netns.Lan()
    try:
        status, err = _broken(["servers"], stdout, cwd=root, env={**os.environ, dnssd.ENV_SWITCH: "on"},
                              prefix=lan.argv(lan.client, *SECURECHAT))
    finally:
        lan.close()
    return status, err, ""


def _one_shot(*argv: str, where: str = "home") -> Callable[[Served, str, Path], tuple[int, str, str]]:
    def run(srv: Served, stdout: str, root: Path) -> tuple[int, str, str]:
        status, err = _broken([a.replace("ROOT", str(root)) for a in argv], stdout,
                              cwd=srv.home if where == "home" else root)
        return status, err, ""
    return run


# subcommand -> a real run whose stdout is broken: (exit status, stderr, what the line says besides)
OUTPUT_RUNS: dict[str, tuple[int, Callable[[Served, str, Path], tuple[int, str, str]]]] = {
    "serve": (0, _run_serve),  # long-running: carries on without its console, exits 0 at SIGTERM
    "connect": (0, _run_connect),  # long-running: keeps chatting
    "gen-certs": (1, _one_shot("gen-certs", "--out", "ROOT/out", where="root")),
    "fingerprint": (1, _one_shot("fingerprint", "certs/ca.pem")),
    "invite": (1, _run_invite),
    "join": (1, _run_join),
    "revoke": (1, _run_revoke),
    "certs": (1, _one_shot("certs")),
    "servers": (1, _run_servers),  # finds nothing on a LAN of its own, and cannot say so
}


def test_every_subcommand_has_an_output_run() -> None:
    assert sorted(OUTPUT_RUNS) == sorted(cli.COMMANDS), "add an entry to OUTPUT_RUNS for the new subcommand"


@pytest.mark.slow
@pytest.mark.parametrize("stdout", BROKEN_STDOUTS)
@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_without_a_working_stdout_is_one_line(served: Served, tmp_path: Path, command: str,
                                                                stdout: str) -> None:
    """Bug 3: `certs | head -1`, `invite --list | head -1`, `join ... | head -1`, `invite NAME > /dev/full`
    traced back. Every subcommand: one line `securechat COMMAND: cannot write to standard output (...)`."""
    if command not in OUTPUT_RUNS:
        pytest.fail(f"no output run for {command!r}: add one to OUTPUT_RUNS")
    expected, run = OUTPUT_RUNS[command]
    status, err, besides = run(served, stdout, tmp_path)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert status == expected, err
    assert err.count("\n") == 1 and err.startswith(f"securechat {command}: cannot write to standard output "
                                                   f"({WHY[stdout]})"), err
    assert besides in err, err


@pytest.mark.parametrize("stdout", BROKEN_STDOUTS)
@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommands_help_without_a_working_stdout_is_one_line(tmp_path: Path, command: str,
                                                                     stdout: str) -> None:
    status, err = _broken([command, "--help"], stdout, cwd=tmp_path)
    assert status == 1, err
    assert err == f"securechat {command}: cannot write to standard output ({WHY[stdout]})\n"


def test_an_invite_nobody_saw_is_not_left_usable(served: Served, tmp_path: Path) -> None:
    """`invite NAME > /dev/full` made an invite whose code nobody ever saw, and left it usable."""
    status, err = _broken(["invite", "ghost"], "/dev/full", cwd=served.home)
    assert status == 1, err
    listed = served.cli("invite", "--list")
    assert listed.returncode == 0 and "ghost" not in listed.stdout, listed.stdout


@pytest.mark.parametrize("pipeline", ["certs", "invite --list", "join"])
def test_the_issues_pipelines_into_head(served: Served, tmp_path: Path, pipeline: str) -> None:
    """The issue's own commands through a real `| head -1`: the first line, then at most one line on stderr."""
    from securechat.pki import builders, ledger
    from securechat.pki.certs import _load_ca

    if pipeline == "certs":  # enough rows that head leaves while the command still writes
        ca_cert, ca_key = _load_ca(served.home / "certs", dt.datetime.now(dt.timezone.utc))
        key = builders.new_key("ec")
        store = ledger.Store(served.home / "certs")
        for i in range(1000):
            name = f"crowd{i}"
            store.record(builders.build_client(key, ca_cert, ca_key, name, 30, dt.datetime.now(dt.timezone.utc)),
                         name, 30, None)
        command = "securechat certs"
    elif pipeline == "invite --list":
        for _ in range(20):
            served.code()
        command = "securechat invite --list"
    else:
        command = f"securechat join {LOOPBACK} {served.code()} --port {served.port}"
    env = {**_config(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {command} | head -1"], cwd=served.home, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    assert done.stdout.count("\n") == 1, done.stdout
    if done.stderr:  # head left before the rest was written
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "cannot write to standard output (broken pipe)" in done.stderr
    else:
        assert done.returncode == 0


@pytest.mark.parametrize("stdout", BROKEN_STDOUTS)
def test_the_menu_without_a_working_stdout_is_one_line(tmp_path: Path, stdout: str) -> None:
    """`securechat` with no command (the seed's menu) prompts on stdout: losing it is one line too."""
    status, err = _broken([], stdout, cwd=tmp_path, stdin="2\n127.0.0.1:1\n")
    assert status == 1, err
    assert err == f"securechat: cannot write to standard output ({WHY[stdout]})\n"
