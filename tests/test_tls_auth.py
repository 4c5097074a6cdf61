"""TLS + SuperNode authentication: `umeml-server certs` output, and a real deployment on 127.0.0.1
where registered sites run a round while an unregistered key and a key-less node are refused with
a clear message. Every process is stopped at the end, even on failure."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from umeml.client.site_cli import check_auth_files
from umeml.data.synth import SynthSpec, generate, split_by_site
from umeml.flower.network import dial_host, probe_superlink
from umeml.flower.processes import free_port, stop_process
from umeml.flower.supernode import explain_supernode_failure
from umeml.server.certs import is_loopback
from umeml.server.cli import main as server_main
from umeml.server.deploy import expand_site_keys

from fed_helpers import spawn_logged

BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- certs command
def _certs(*args: str) -> int:
    return server_main(["certs", *args])


def test_certs_command_writes_ca_server_cert_and_site_keys(tmp_path):
    out = tmp_path / "pki"
    assert _certs("--out", str(out), "--sites", "A0,A1", "--host", "hub.example.org", "--host", "10.1.2.3") == 0
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["ca.crt", "ca.key", "server.key", "server.pem", "sites/A0", "sites/A0.pub", "sites/A1",
                     "sites/A1.pub"]
    # private keys 0600, public material 0644
    for private in ("ca.key", "server.key", "sites/A0", "sites/A1"):
        assert stat.S_IMODE(os.stat(out / private).st_mode) == 0o600, private
    for public in ("ca.crt", "server.pem", "sites/A0.pub"):
        assert stat.S_IMODE(os.stat(out / public).st_mode) == 0o644, public

    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "hub.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(a) for a in
                                                            ("127.0.0.1", "::1", "10.1.2.3")}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    server_key = serialization.load_pem_private_key((out / "server.key").read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()

    for site in ("A0", "A1"):
        text = (out / "sites" / site).read_bytes()
        assert text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")  # ssh-keygen's format
        private = serialization.load_ssh_private_key(text, None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        pub_line = (out / "sites" / f"{site}.pub").read_text()
        assert pub_line.startswith("ecdsa-sha2-nistp384 ") and pub_line.rstrip().endswith(f"umeml-site-{site}")
        public = serialization.load_ssh_public_key(pub_line.encode())
        assert public.public_numbers() == private.public_key().public_numbers()
    a0 = serialization.load_ssh_public_key((out / "sites" / "A0.pub").read_bytes())
    a1 = serialization.load_ssh_public_key((out / "sites" / "A1.pub").read_bytes())
    assert a0.public_numbers() != a1.public_numbers()

    from umeml.server.certs import certificate_names, names_host

    names = certificate_names(out / "server.pem")
    for host in ("127.0.0.1", "0.0.0.0", "localhost", "hub.example.org", "10.1.2.3", "::1", "[::1]"):
        assert names_host(names, host), host
    for host in ("10.1.2.4", "other.example.org", "example.org"):
        assert not names_host(names, host), host
    assert names_host(["*.example.org"], "hub.example.org") and not names_host(["*.example.org"], "a.b.example.org")

    # what Flower's own readers accept (flwr supernode register / flower-supernode)
    from flwr.cli.supernode.register import try_load_public_key

    assert b"BEGIN PUBLIC KEY" in try_load_public_key(out / "sites" / "A0.pub")
    assert check_auth_files(out / "ca.crt", out / "sites" / "A0") is None


def test_certs_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "pki"
    assert _certs("--out", str(out), "--sites", "A0") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _certs("--out", str(out), "--sites", "A0,B9") == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "ca.key" in err and "--force" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched, B9 not written
    # a new site only: keys, CA and server certificate left alone
    assert _certs("--out", str(out), "--sites", "B9", "--keys-only") == 0
    assert (out / "sites" / "B9").is_file() and (out / "ca.key").read_bytes() == before[out / "ca.key"]
    assert _certs("--out", str(out), "--sites", "A0", "--keys-only") == 2
    # rotation of A0's key
    assert _certs("--out", str(out), "--sites", "A0", "--keys-only", "--force") == 0
    assert (out / "sites" / "A0").read_bytes() != before[out / "sites" / "A0"]
    assert stat.S_IMODE(os.stat(out / "sites" / "A0").st_mode) == 0o600
    assert (out / "ca.key").read_bytes() == before[out / "ca.key"]
    # a new SuperLink certificate from the same CA (renewal, another host name)
    assert _certs("--out", str(out), "--server-only", "--host", "hub2.example.org") == 2  # exists: --force
    assert _certs("--out", str(out), "--server-only", "--host", "hub2.example.org", "--force") == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    renewed = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    renewed.verify_directly_issued_by(ca)
    assert "hub2.example.org" in renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName)
    assert (out / "server.pem").read_bytes() != before[out / "server.pem"]
    assert (out / "ca.key").read_bytes() == before[out / "ca.key"]
    assert stat.S_IMODE(os.stat(out / "server.key").st_mode) == 0o600
    assert _certs("--out", str(tmp_path / "empty"), "--server-only") == 2  # no CA to issue it
    # everything anew
    assert _certs("--out", str(out), "--sites", "A0", "--force") == 0
    assert (out / "ca.key").read_bytes() != before[out / "ca.key"]
    assert _certs("--out", str(out), "--sites", "../evil") == 2


def test_auth_file_checks_and_refusal_messages(tmp_path):
    assert _certs("--out", str(tmp_path), "--sites", "A0") == 0
    assert "needs --root-certificates" in check_auth_files(None, tmp_path / "sites" / "A0")
    pub_as_key = check_auth_files(tmp_path / "ca.crt", tmp_path / "sites" / "A0.pub")
    assert "not an unencrypted OpenSSH private key" in pub_as_key
    assert "not a PEM certificate" in check_auth_files(tmp_path / "sites" / "A0.pub", None)
    assert "not found" in check_auth_files(tmp_path / "nope.crt", None)
    unregistered = "ERROR : Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n" \
                   "[code: 2004] Failed to activate SuperNode.\n"
    msg = explain_supernode_failure("A7", "127.0.0.1:9092", unregistered, tmp_path / "sites" / "A7")
    assert msg.startswith("site A7: not admitted by 127.0.0.1:9092") and "not registered" in msg
    assert "A7.pub" in msg
    assert "requires SuperNode authentication" in explain_supernode_failure(
        "A7", "h:1", "[code: 2001] SuperNode authentication is enabled.")
    assert "TLS verification" in explain_supernode_failure("A7", "h:1", "[SSL: CERTIFICATE_VERIFY_FAILED] x")
    assert explain_supernode_failure("A7", "h:1", "Exit Code: 999 something else") is None
    # key folders expand to their .pub files
    assert [k.name for k in expand_site_keys([tmp_path / "sites"])] == ["A0.pub"]
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    assert dial_host("0.0.0.0") == "127.0.0.1" and dial_host("127.0.0.1") == "127.0.0.1"


def _serve(sock, tls_ctx, stop):
    """Accept connections on ``sock`` until ``stop``: TLS with ``tls_ctx``, else a plain HTTP 400."""
    import socket

    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except socket.timeout:
            continue
        except OSError:
            return
        try:
            conn.settimeout(5)
            if tls_ctx is not None:
                with tls_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            else:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            pass
        finally:
            conn.close()


@pytest.mark.timeout(60)
def test_tls_probe_names_the_mismatch(tmp_path):
    import socket
    import ssl
    import threading

    assert _certs("--out", str(tmp_path / "pki"), "--sites", "A0") == 0
    assert _certs("--out", str(tmp_path / "other")) == 0
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "pki" / "server.pem", tmp_path / "pki" / "server.key")
    results = {}
    for mode, server_ctx in (("tls", ctx), ("plain", None)):
        sock = socket.create_server(("127.0.0.1", 0))
        stop = threading.Event()
        thread = threading.Thread(target=_serve, args=(sock, server_ctx, stop), daemon=True)
        thread.start()
        addr = f"127.0.0.1:{sock.getsockname()[1]}"
        try:
            results[mode] = [probe_superlink(addr, ca, timeout=5) for ca in
                             (tmp_path / "pki" / "ca.crt", tmp_path / "other" / "ca.crt", None)]
            if mode == "tls":
                results["localhost"] = probe_superlink(addr.replace("127.0.0.1", "localhost"),
                                                       tmp_path / "pki" / "ca.crt")
        finally:
            stop.set()
            thread.join(timeout=10)
            sock.close()
    right, wrong_ca, no_ca = results["tls"]
    assert right is None and results["localhost"] is None
    assert "not trusted (unable to get local issuer certificate)" in wrong_ca and "other/ca.crt" in wrong_ca
    assert "uses TLS: give --root-certificates" in no_ca
    p_right, _, p_none = results["plain"]
    assert "does the coordinator use --tls-dir" in p_right and p_none is None
    assert probe_superlink(f"127.0.0.1:{free_port()}", None) is None  # nothing listens yet: Flower waits


def test_exposure_warning():
    from umeml.server.cli import exposure_warning

    assert exposure_warning("127.0.0.1", 9092, True, True) is None
    assert exposure_warning("127.0.0.1", 9092, False, False) is None  # loopback testing
    assert "authentication off" in exposure_warning("127.0.0.1", 9092, True, False)
    plain = exposure_warning("0.0.0.0", 9092, False, False)
    assert "NOT encrypted" in plain and "Control API" in plain and "reverse proxy" in plain
    tls = exposure_warning("hub.example.org", 9092, True, True)
    assert "NOT encrypted" not in tls and "Control API on this port has no authentication" in tls


def test_site_keys_need_tls(tmp_path, capsys):
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    assert _certs("--out", str(tmp_path / "pki"), "--sites", "A0") == 0
    start = ["start", "--config", str(tmp_path / "exp.yaml"), "--sites", "1", "--out", str(tmp_path / "run")]
    rc = server_main([*start, "--site-keys", str(tmp_path / "pki" / "sites")])
    assert rc == 2 and "--site-keys needs --tls-dir" in capsys.readouterr().err
    # the certificate must name the address the SuperLink is dialed at (checked before anything starts)
    rc = server_main([*start, "--tls-dir", str(tmp_path / "pki"), "--host", "hub.example.org"])
    err = capsys.readouterr().err
    assert rc == 2 and "is not valid for --host hub.example.org" in err and "umeml-server certs --host" in err


def test_start_preflight_reports_every_problem_at_once(tmp_path, capsys):
    """`umeml-server start` checks everything before anything starts and names every problem."""
    (tmp_path / "bad.yaml").write_text("federation: {rounds: 0}\n")
    start = ["start", "--sites", "1", "--out", str(tmp_path / "run")]
    rc = server_main([*start, "--config", str(tmp_path / "bad.yaml"), "--tls-dir", str(tmp_path / "no-pki"),
                      "--site-keys", str(tmp_path / "no-keys")])
    err = capsys.readouterr().err
    assert rc == 2 and "3 problems, nothing started" in err
    assert "federation.rounds: must be >= 1" in err
    assert "TLS files missing" in err and str(tmp_path / "no-pki" / "ca.crt") in err
    assert f"--site-keys: site key {tmp_path / 'no-keys'} not found" in err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    # no config given, and a certificate that does not name --host: both reported
    assert _certs("--out", str(tmp_path / "pki")) == 0
    rc = server_main([*start, "--tls-dir", str(tmp_path / "pki"), "--host", "hub.example.org"])
    err = capsys.readouterr().err
    assert rc == 2 and "2 problems" in err and "needs --config or --resume" in err
    assert "is not valid for --host hub.example.org" in err
    # a server.pem that is not a certificate is named, not a traceback
    (tmp_path / "pki" / "server.pem").write_text("not a certificate\n")
    rc = server_main([*start, "--tls-dir", str(tmp_path / "pki")])
    err = capsys.readouterr().err
    assert rc == 2 and "server.pem is not a PEM certificate" in err and "Traceback" not in err


# --------------------------------------------------------------------------- real deployment
EXPERIMENT = """\
tasks: [grade, subtype, survival]
split: {test_sites: [A1]}
data: {max_patches: 16}
model: {hidden_dim: 8, n_prototypes: 2, n_registers: 1}
train: {batch_size: 8, lr: 0.003, bootstrap: 0}
federation: {rounds: 1, local_epochs: 1, min_train_sites: 1, k_min_patients: 5}
"""



def _wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before printing {text!r}:\n{path.read_text()}")
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in {path} after {timeout} s:\n{path.read_text()}")


@pytest.fixture
def staged(tmp_path):
    generate(SynthSpec(sites=2, patients=12, seed=3, feature_dim=8, median_patches=12, min_patches=4, max_patches=24),
             tmp_path / "all")
    ids = split_by_site(tmp_path / "all", tmp_path / "sites")
    assert ids == ["A0", "A1"]
    # the rogue site has real data (A0's copy) and a key pair, but its key is never registered
    # the impostor's key is registered (as "imp"), but its site file claims to be A1
    for s, claims, data in (("A0", "A0", "A0"), ("A1", "A1", "A1"), ("rogue", "rogue", "A0"),
                            ("nokey", "nokey", "A0"), ("imp", "A1", "A1")):
        (tmp_path / f"{s}.yaml").write_text(
            f"site_id: {claims}\ndata_dir: sites/{data}\ndevice: cpu\nk_min_patients: 5\nstate_dir: state/{s}\n")
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    assert _certs("--out", str(tmp_path / "pki"), "--sites", "A0,A1,rogue,imp") == 0
    return tmp_path


def _check_refused_before_flower(d: Path, client) -> None:
    """A key without TLS, and no TLS against a TLS SuperLink (which Flower's SuperNode would retry
    forever), are refused by umeml-client itself with exit 2 and a message naming the cause."""
    key_no_tls = client("A0", "--auth-key", "pki/sites/A0", log="key-no-tls")
    no_tls = client("A0", log="no-tls")
    assert key_no_tls.wait(timeout=60) == 2 and no_tls.wait(timeout=60) == 2
    assert "error: site A0: --auth-key needs --root-certificates" in (d / "key-no-tls.log").read_text()
    assert "error: site A0: the SuperLink at 127.0.0.1" in (d / "no-tls.log").read_text()
    assert "uses TLS: give --root-certificates" in (d / "no-tls.log").read_text()


def _check_deployment_outcome(d: Path, out: str) -> None:
    """After the run: the server's log, the round's result and every refused site's log say what
    happened, in our words."""
    assert "registered site keys: A0, A1, imp (only these may join)" in out
    # the impostor: refused by the coordinator with the site id it claimed, told why, stopped
    assert "WARNING: site A1 (node" in out and "refused" in out
    imp_log = (d / "imp.log").read_text()
    assert "error: site A1: the coordinator refused this site" in imp_log and "registered as 'imp'" in imp_log
    assert "TLS, SuperNode authentication on" in out
    final = json.loads((d / "run" / "final.json").read_text())
    assert final["rounds"] == 1 and final["training_sites"] == ["A0"] and final["held_out_sites"] == ["A1"]
    assert final["held_out"]["A1"]["n"] == 12
    # the refusals name the site and the cause, in our words
    rogue_log = (d / "rogue.log").read_text()
    assert "error: site rogue: not admitted by 127.0.0.1" in rogue_log
    assert "not registered at the SuperLink" in rogue_log and "pki/sites/rogue.pub" in rogue_log
    nokey_log = (d / "nokey.log").read_text()
    assert "error: site nokey: not admitted" in nokey_log and "requires SuperNode authentication" in nokey_log
    link_log = (d / "run" / "superlink.log").read_text()
    assert "https://127.0.0.1" in link_log  # the SuperLink served TLS
    assert "ApiError:2004" in link_log and "ApiError:2001" in link_log


@pytest.mark.slow  # SuperLink + SuperNodes with TLS and site keys
@pytest.mark.timeout(480)  # ~130 s on an idle 2-core box
def test_tls_auth_deployment_registered_sites_run_unregistered_refused(staged):
    """Registered sites run a round; refused: a key without TLS, no TLS, an unregistered key, no
    key, and a registered key whose site file claims another site id (joining at the start: it is
    told why and stops with exit 3, the run goes on without it)."""
    d = staged
    port = free_port()
    server_addr = f"127.0.0.1:{port}"
    tls = ["--root-certificates", "pki/ca.crt"]
    procs: list[subprocess.Popen] = []

    def client(site: str, *extra: str, log: str | None = None) -> subprocess.Popen:
        proc = spawn_logged([str(BIN / "umeml-client"), "start", "--site", f"{site}.yaml", "--server", server_addr,
                       "--port", str(free_port()), *extra], d / f"{log or site}.log", d)
        procs.append(proc)
        return proc

    try:
        server = spawn_logged([str(BIN / "umeml-server"), "start", "--config", "exp.yaml", "--sites", "2", "--out", "run",
                         "--port", str(port), "--wait-timeout", "300", "--tls-dir", "pki",
                         "--site-keys", "pki/sites/A0.pub", "pki/sites/A1.pub", "pki/sites/imp.pub"],
                        d / "server.log", d)
        procs.append(server)
        impostor = client("imp", *tls, "--auth-key", "pki/sites/imp")
        # registered sites may start first: they wait for the SuperLink, whose port opens only
        # once their keys are registered
        client("A0", *tls, "--auth-key", "pki/sites/A0")
        client("A1", *tls, "--auth-key", "pki/sites/A1")
        _wait_for_text(d / "server.log", "SuperLink on 127.0.0.1", server, 120)
        _check_refused_before_flower(d, client)
        # refused by the SuperLink: an unregistered key, and no key at all
        rogue = client("rogue", *tls, "--auth-key", "pki/sites/rogue")
        nokey = client("nokey", *tls)
        assert rogue.wait(timeout=120) != 0
        assert nokey.wait(timeout=120) != 0
        assert impostor.wait(timeout=300) == 3, (d / "imp.log").read_text()[-3000:]
        rc = server.wait(timeout=420)
        out = (d / "server.log").read_text()
        assert rc == 0, out + "\n" + (d / "run" / "superlink.log").read_text()[-3000:]
    finally:
        for p in procs:
            stop_process(p, grace=15)
    _check_deployment_outcome(d, out)
    assert all(p.poll() is not None for p in procs)
