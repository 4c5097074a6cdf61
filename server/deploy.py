"""``umeml-server start``: a real Flower deployment (SuperLink process + ``flwr run``) on this machine.

The coordinator starts Flower's SuperLink, waits for the sites' SuperNodes, submits the umeml
app with ``flwr run`` and polls its status with ``flwr ls`` (``flwr run --stream`` exits 0 even
when a run failed). The app bundle carries configuration only: a ``pyproject.toml`` whose
components point at the **installed** ``umeml.server.app:app`` / ``umeml.client.app:app``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from umeml import __version__
from umeml.config import ExperimentConfig, config_to_dict

APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "umeml-app"
version = "{version}"
description = "umeml federation (configuration only: sites run their installed umeml)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "umeml"

[tool.flwr.app.components]
serverapp = "umeml.server.app:app"
clientapp = "umeml.client.app:app"

[tool.flwr.app.config]
experiment = "{{}}"
run-dir = ""
resume = 0
expected-sites = 1
held-out = ""
wait-timeout = 300
"""


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's processes: own home, no telemetry, no update check, no installs."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # SuperExec polls for new tasks every second by default; 0.25 s waits less without
        # burning a 2-core machine on idle polls (one SuperExec per node)
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25"),
        "PYTHONUNBUFFERED": "1",
    })
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def dial_host(host: str) -> str:
    """The address a local client dials for a SuperLink bound to ``host`` (bind-all -> loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def expand_site_keys(paths: list[Path]) -> list[Path]:
    """Public key files from ``--site-keys``: files as given, folders as their ``*.pub`` files."""
    keys: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.pub"))
            if not found:
                raise FileNotFoundError(f"no *.pub key in {path}")
            keys += found
        elif path.is_file():
            keys.append(path)
        else:
            raise FileNotFoundError(f"site key {path} not found")
    names = [k.name[:-4] if k.name.endswith(".pub") else k.name for k in keys]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"several key files for site(s) {dup}")
    return keys


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until something listens on host:port; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {host}:{port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM (Flower leaves gracefully), then SIGKILL the whole process group after ``grace``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


@dataclass
class TLSFiles:
    """Paths of the CA certificate, the SuperLink's certificate and key (PEM)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass
class SuperLink:
    """A running SuperLink process with its connection registered for the ``flwr`` CLI."""

    host: str
    port: int
    flwr_home: Path
    log_path: Path
    tls: TLSFiles | None = None
    node_auth: bool = False
    proc: subprocess.Popen | None = field(default=None, repr=False)
    registered: dict[str, int] = field(default_factory=dict)  # site key name -> Flower node id

    @property
    def connection(self) -> str:
        """Name of the CLI connection to this SuperLink in ``FLWR_HOME/config.toml``."""
        return "umeml"

    def start(self, timeout: float = 60.0, site_keys: list[Path] | None = None) -> "SuperLink":
        """Start ``flower-superlink`` and write the CLI connection file.

        With ``node_auth`` the SuperLink's database, which holds the registered site keys, is
        started afresh: exactly ``site_keys`` may join, and a key left out is revoked rather than
        kept from an earlier start. The keys are registered on a loopback-only SuperLink over the
        same database before this one opens its port, so no site can connect before its key is
        known (Flower refuses such a site and its SuperNode exits). Fills ``self.registered``.
        """
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.node_auth:
            if self.tls is None:
                raise ValueError("SuperNode authentication needs TLS (Flower refuses node keys without it)")
            database = self.flwr_home / "superlink.db"
            for stale in (database, database.with_name(database.name + "-wal"),
                          database.with_name(database.name + "-shm"), database.with_name(database.name + "-journal")):
                stale.unlink(missing_ok=True)
            if site_keys:
                setup = SuperLink("127.0.0.1", free_port(), self.flwr_home, self.log_path, self.tls, node_auth=True)
                try:
                    setup._launch(timeout)
                    self.registered = setup.register_site_keys(site_keys)
                finally:
                    setup.stop()
        return self._launch(timeout)

    def _launch(self, timeout: float) -> "SuperLink":
        database = self.flwr_home / "superlink.db"
        cmd = ["flower-superlink", "--host", self.host, "--port", str(self.port),
               "--disable-runtime-dependency-installation", "--database", str(database)]
        if self.tls is None:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                    "--ssl-keyfile", str(self.tls.server_key)]
            if self.node_auth:
                cmd.append("--enable-supernode-auth")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, env=flower_env(self.flwr_home), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for_port(dial_host(self.host).strip("[]"), self.port, timeout, self.proc)
        lines = ["[superlink]", f'default = "{self.connection}"', "", f"[superlink.{self.connection}]",
                 f'address = "{dial_host(self.host)}:{self.port}"']
        if self.tls is None:
            lines.append("insecure = true")
        else:
            lines += ["insecure = false", f'root-certificates = "{self.tls.ca_cert.resolve()}"']
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")
        return self

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this SuperLink."""
        return subprocess.run(["flwr", *args], env=flower_env(self.flwr_home), capture_output=True, text=True,
                              timeout=timeout)

    def register_site_keys(self, keys: list[Path]) -> dict[str, int]:
        """Register the sites' OpenSSH public keys (``flwr supernode register``), named after the
        file (``sites/A0.pub`` -> ``A0``); returns {name: node id}. Raises RuntimeError naming
        the key file and Flower's reason when one is refused (bad format, key already in use)."""
        nodes = {}
        for key in keys:
            name = key.name[:-4] if key.name.endswith(".pub") else key.name
            res = self.flwr("supernode", "register", str(key.resolve()), self.connection, "--name", name,
                            "--format", "json")
            try:
                info = json.loads(res.stdout[res.stdout.index("{"):])
            except ValueError:
                info = {}
            if res.returncode != 0 or not info.get("success"):
                reason = info.get("error-message") or (res.stdout + " " + res.stderr).strip()
                raise RuntimeError(f"registering site key {key} failed: {reason}")
            nodes[name] = int(info["node-id"])
        return nodes

    def stop(self) -> None:
        """Stop the SuperLink and its children."""
        if self.proc is not None:
            stop_process(self.proc)


def write_app_dir(app_dir: Path) -> Path:
    """The configuration-only app bundle directory (never the repository root, whose ``umeml/``
    folder would shadow the installed package when Flower puts the app first on ``sys.path``)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT.format(version=__version__))
    return app_dir


def _toml_string(value: str) -> str:
    return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes


def write_run_config(path: Path, cfg: ExperimentConfig, run_dir: Path, expected_sites: int,
                     held_out: tuple[str, ...], resume: bool, wait_timeout: float) -> Path:
    """The run-config overrides file that ``flwr run --run-config`` reads."""
    values = {
        "experiment": json.dumps(config_to_dict(cfg)),
        "run-dir": str(run_dir.resolve()),
        "held-out": ",".join(held_out),
    }
    lines = [f"{k} = {_toml_string(v)}" for k, v in values.items()]
    lines += [f"resume = {int(resume)}", f"expected-sites = {expected_sites}", f"wait-timeout = {float(wait_timeout)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


class RunFailed(Exception):
    """The Flower run ended in a state other than finished:completed."""


def submit_and_wait(link: SuperLink, app_dir: Path, run_config: Path, poll: float = 30.0,
                    timeout: float = 24 * 3600, on_poll=None, tick: float = 0.5,
                    done_marker: Path | None = None) -> tuple[int, str]:
    """``flwr run`` the app, then poll ``flwr ls`` until the run finishes; return (run id, status).

    ``flwr ls`` starts a Python process (2 s of CPU), so it runs only every ``poll`` seconds, or
    at once when ``done_marker`` (the run's final.json) appears; ``on_poll`` (progress display)
    runs every ``tick`` seconds in between.
    """
    res = link.flwr("run", str(app_dir), link.connection, "--run-config", str(run_config), "--format", "json")
    try:
        info = json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        info = {}
    if res.returncode != 0 or not info.get("success"):
        raise RunFailed(f"flwr run failed (exit {res.returncode}): {res.stdout.strip()} {res.stderr.strip()}")
    run_id = int(info["run-id"])
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        ls = link.flwr("ls", link.connection, "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(ls.stdout[ls.stdout.index("{"):]).get("runs", [])
            status = str(runs[0]["status"]) if runs else status
        except (ValueError, KeyError, IndexError):
            pass
        if status.startswith("finished"):
            return run_id, status
        next_poll = time.monotonic() + poll
        while time.monotonic() < next_poll:
            if on_poll is not None:
                on_poll()
            if done_marker is not None and done_marker.exists():
                next_poll = min(next_poll, time.monotonic() + 1.0)
            time.sleep(tick)
    raise RunFailed(f"run {run_id} still {status} after {timeout:.0f} s")


def supernode_command(server: str, port: int, site_config: Path, root_cert: Path | None = None,
                      auth_key: Path | None = None) -> list[str]:
    """The ``flower-supernode`` command line for a site."""
    cmd = ["flower-supernode", "--superlink", server, "--port", str(port),
           "--node-config", f'site-config="{site_config.resolve()}"']
    if root_cert is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_cert)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


# What a SuperNode prints when the SuperLink refuses it, and what that means for a site. Flower
# 1.42 exits (code 1, "Exit Code: 305") on these instead of retrying; its own words are terse.
_REFUSALS = (
    ("[code: 2004]", "the coordinator refused this site's key: it is not registered at the SuperLink "
                     "(or another SuperNode with the same key is already connected). Send the site's public "
                     "key ({key}.pub) to the coordinator, who registers it with `umeml-server start --site-keys`"),
    ("[code: 2001]", "the coordinator requires SuperNode authentication: start with --auth-key "
                     "<this site's private key> whose .pub the coordinator registered"),
    ("Exit Code: 302", "the key given with --auth-key is not an OpenSSH EC private key "
                       "(create one with `umeml-server certs --keys-only` or `ssh-keygen -t ecdsa -b 384 -N ''`)"),
    ("Exit Code: 303", "--auth-key needs TLS: give --root-certificates"),
    ("CERTIFICATE_VERIFY_FAILED", "TLS verification of the coordinator failed: --root-certificates must be the "
                                  "coordinator's ca.crt and {server} must be in the SuperLink certificate's "
                                  "names (`umeml-server certs --host`)"),
    ("WRONG_VERSION_NUMBER", "TLS mismatch: the coordinator's SuperLink is not using TLS "
                             "(or this site is missing --root-certificates)"),
)


def explain_supernode_failure(site_id: str, server: str, output: str, auth_key: Path | None = None) -> str | None:
    """A one-line reason naming the site when a SuperNode's ``output`` shows a refusal, else None."""
    for marker, reason in _REFUSALS:
        if marker in output:
            key = str(auth_key) if auth_key is not None else "<site key>"
            if key.endswith(".pub"):
                key = key[:-4]
            host = server.rsplit(":", 1)[0]
            return f"site {site_id}: not admitted by {server}: " + reason.format(key=key, server=host)
    return None


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def probe_superlink(server: str, root_cert: Path | None, timeout: float = 5.0) -> str | None:
    """Check the TLS setting against a reachable SuperLink before a SuperNode starts.

    Flower's SuperNode retries forever when TLS is on at one end only, and reports a wrong CA
    or a certificate without the dialed name only in its log. Returns why the site cannot
    connect, or None (also when nothing listens yet: the SuperNode then waits and retries).
    """
    import ssl

    host, port = split_address(server)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None  # coordinator not up (yet)
    with raw:
        if root_cert is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            try:
                with ctx.wrap_socket(raw, server_hostname=host):
                    return (f"the SuperLink at {server} uses TLS: give --root-certificates "
                            "(the coordinator's ca.crt)")
            except (ssl.SSLError, OSError):
                return None  # plain HTTP, as this site expects
        ctx = ssl.create_default_context(cafile=str(root_cert))
        try:
            with ctx.wrap_socket(raw, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as err:
            if "mismatch" in str(err.verify_message):  # X509 hostname / IP address mismatch
                return (f"the SuperLink's certificate does not name {host} ({err.verify_message}): the coordinator "
                        f"re-creates it with `umeml-server certs --host {host}`")
            return (f"the SuperLink's certificate is not trusted ({err.verify_message}): --root-certificates "
                    f"{root_cert} must be the coordinator's ca.crt")
        except ssl.SSLError as err:
            return f"TLS with the SuperLink at {server} failed ({err.reason}): does the coordinator use --tls-dir?"
        except OSError as err:
            return f"TLS with the SuperLink at {server} failed: {err}"


def which_or_fail(name: str) -> str:
    """Absolute path of a Flower executable next to this Python, or a clear error."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: is flwr installed in this environment?")
    return found
