"""gen-certs command line: in process through securechat.pki.certs.main, and as real subprocesses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cryptography
import pytest

from securechat.pki.gencerts import main
from securechat.wire.tls import client_context, file_fingerprint, server_context

REPO = Path(__file__).resolve().parents[2]
FINGERPRINT = r"(?:[0-9A-F]{2}:){31}[0-9A-F]{2}"


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_main_writes_and_reports(tmp_path, capsys, certs_handshake):  # type: ignore[no-untyped-def]
    out = tmp_path / "certs"
    assert main(["--out", str(out), "--host", "chat.lan", "--ip", "192.168.1.20", "--client", "alice"]) == 0
    stdout = capsys.readouterr().out
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "client-alice.pem", "client-alice.key"):
        assert str(out / name) in stdout
    assert f"CA SHA-256 fingerprint:     {file_fingerprint(out / 'ca.pem')}" in stdout
    assert f"Server SHA-256 fingerprint: {file_fingerprint(out / 'server.pem')}" in stdout
    # With clients, the suggested command carries each one's --cert/--key (issue 11).
    assert "Start the server with: securechat serve --require-client-cert" in stdout
    assert (
        f"Give alice {out / 'client-alice.pem'}, {out / 'client-alice.key'} and {out / 'ca.pem'} (only theirs), "
        "then alice runs: securechat connect chat.lan --ca ca.pem --cert client-alice.pem --key client-alice.key"
        in stdout
    )
    certs_handshake(
        server_context(out / "server.pem", out / "server.key"), client_context(out / "ca.pem"), "192.168.1.20"
    )


def test_main_rerun_reuses_ca_then_force_replaces(tmp_path, capsys):  # type: ignore[no-untyped-def]
    assert main(["--out", str(tmp_path)]) == 0
    ca = file_fingerprint(tmp_path / "ca.pem")
    capsys.readouterr()
    assert main(["--out", str(tmp_path)]) == 0
    assert "Reused the local CA" in capsys.readouterr().out
    assert file_fingerprint(tmp_path / "ca.pem") == ca
    assert main(["--out", str(tmp_path), "--force"]) == 0
    assert "Created a new local CA" in capsys.readouterr().out
    assert file_fingerprint(tmp_path / "ca.pem") != ca


@pytest.mark.parametrize("damage", ["drop-key", "outside-host"])
def test_main_refusal_is_one_line_exit_1_untouched(tmp_path, capsys, damage):  # type: ignore[no-untyped-def]
    assert main(["--out", str(tmp_path)]) == 0
    extra: list[str] = []
    if damage == "drop-key":
        (tmp_path / "ca.key").unlink()
    else:
        extra = ["--host", "www.example.com"]
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(["--out", str(tmp_path), *extra]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("securechat gen-certs: ") and captured.err.count("\n") == 1
    assert "--force" in captured.err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args",
    [
        ["--client", "bad name"],
        ["--client", "x" * 25],
        ["--days", "0"],
        ["--days", "ninety"],
        ["--key-type", "dsa"],
        ["--ip", "not-an-ip"],
        ["--host", "bad_host!"],
        ["--bogus"],
    ],
)
def test_main_usage_errors_exit_2_and_write_nothing(tmp_path, capsys, args):  # type: ignore[no-untyped-def]
    assert main(["--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("securechat gen-certs: ") and err.endswith("; see 'securechat gen-certs --help'\n")
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_main_help(capsys):  # type: ignore[no-untyped-def]
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: securechat gen-certs")
    for option in ("--out", "--host", "--ip", "--client", "--days", "--key-type", "--force"):
        assert option in text


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_script_runs_from_a_plain_checkout(tmp_path):  # type: ignore[no-untyped-def]
    # -S skips site-packages and its .pth files, so the editable install of securechat is invisible;
    # PYTHONPATH brings back only the third-party dependencies. The script must find the package itself.
    env = {**os.environ, "PYTHONPATH": str(Path(cryptography.__file__).resolve().parent.parent)}
    probe = _run([sys.executable, "-S", "-c", "import securechat"], tmp_path, env)
    assert probe.returncode != 0, "securechat is importable without the script's help: test proves nothing"

    done = _run(
        [sys.executable, "-S", str(REPO / "scripts" / "gen_certs.py"), "--host", "chat.lan"], tmp_path, env
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "certs"  # the default --out, relative to the working directory
    assert re.search(f"Server SHA-256 fingerprint: {FINGERPRINT}", done.stdout)
    assert file_fingerprint(out / "server.pem") in done.stdout
    assert "then run: securechat connect chat.lan --ca ca.pem" in done.stdout

    usage = _run([sys.executable, "-S", str(REPO / "scripts" / "gen_certs.py"), "--help"], tmp_path, env)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: gen_certs.py")


def test_python_m_securechat_gen_certs(tmp_path):  # type: ignore[no-untyped-def]
    done = _run([sys.executable, "-m", "securechat", "gen-certs", "--out", "mine"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert file_fingerprint(tmp_path / "mine" / "ca.pem") in done.stdout
    again = _run(
        [sys.executable, "-m", "securechat", "gen-certs", "--out", "mine", "--host", "www.example.com"],
        tmp_path,
    )
    assert again.returncode == 1
    assert again.stderr.startswith("securechat gen-certs: ")


def _recipe() -> list[str]:
    """The README's multi-server recipe, as written (the bash block after "Certificates from one CA")."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("**Certificates from one CA.**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("   #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def _sans(pem: Path) -> set[str]:
    from cryptography import x509

    san = x509.load_pem_x509_certificate(pem.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | \
        {str(v) for v in san.get_values_for_type(x509.IPAddress)}


def test_the_readme_multi_server_recipe_gives_each_server_a_certificate_naming_only_itself(tmp_path):  # type: ignore[no-untyped-def]
    """Issue 18: chat2's certificate was also valid for chat1's name and address (and this machine's)."""
    from securechat.wire import netinfo

    steps = _recipe()
    assert steps[-1].startswith("scp "), steps  # the copy to chat2 needs chat2: everything before it runs here
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for step in steps[:-1]:
        done = subprocess.run(["bash", "-c", step], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (step, done.stderr)
    loopback = {"localhost", "127.0.0.1", "::1"}
    chat1, chat2 = _sans(tmp_path / "certs" / "server.pem"), _sans(tmp_path / "certs-chat2" / "server.pem")
    assert chat2 == loopback | {"chat2.lan", "10.0.0.2"}
    assert {"chat1.lan", "10.0.0.1"} <= chat1 and not {"chat2.lan", "10.0.0.2"} & chat1
    here = {*netinfo.machine_names(), *(str(a) for a in netinfo.local_addresses())} - loopback
    assert here <= chat1 and not here & chat2  # the CA's machine is chat1 in the recipe, never chat2
    # Both chain to the one CA, so clients need one ca.pem.
    assert (tmp_path / "certs" / "ca.pem").read_bytes() == (tmp_path / "certs-chat2" / "ca.pem").read_bytes()


def test_other_machine_needs_the_machines_names(tmp_path, capsys):  # type: ignore[no-untyped-def]
    assert main(["--out", str(tmp_path / "c"), "--other-machine"]) == 2
    err = capsys.readouterr().err
    assert err == ("securechat gen-certs: --other-machine needs that machine's --host NAME or --ip ADDR; "
                   "see 'securechat gen-certs --help'\n")
    assert not (tmp_path / "c").exists()
