"""``umeml-server start``: a real Flower deployment (SuperLink process + ``flwr run``) on this machine.

The coordinator starts Flower's SuperLink, waits for the sites' SuperNodes, submits the umeml
app with ``flwr run`` and polls its status with ``flwr ls`` (``flwr run --stream`` exits 0 even
when a run failed). The app bundle carries configuration only: a ``pyproject.toml`` whose
components point at the **installed** ``umeml.server.app:app`` / ``umeml.client.app:app``.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from umeml import __version__
from umeml.config import ExperimentConfig, config_to_dict
from umeml.errors import FederationError
from umeml.flower.network import dial_host
from umeml.flower.processes import die_with_parent, flower_env, free_port, port_is_free, stop_process, wait_for_port
from umeml.flower.superexec_main import superexec_command

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
    superexec: bool = True  # start the SuperExec that runs ServerApps (False: a SuperLink for key registration)
    proc: subprocess.Popen | None = field(default=None, repr=False)
    superexec_proc: subprocess.Popen | None = field(default=None, repr=False)
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
                setup = SuperLink("127.0.0.1", free_port(), self.flwr_home, self.log_path, self.tls, node_auth=True,
                                  superexec=False)
                try:
                    setup._launch(timeout)
                    self.registered = setup.register_site_keys(site_keys)
                finally:
                    setup.stop()
        return self._launch(timeout)

    def _launch(self, timeout: float) -> "SuperLink":
        database = self.flwr_home / "superlink.db"
        # --isolation process: the SuperExec that starts ServerApps is ours (_start_superexec)
        cmd = ["flower-superlink", "--host", self.host, "--port", str(self.port),
               "--disable-runtime-dependency-installation", "--database", str(database), "--isolation", "process"]
        if self.tls is None:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                    "--ssl-keyfile", str(self.tls.server_key)]
            if self.node_auth:
                cmd.append("--enable-supernode-auth")
        if not port_is_free(self.host, self.port):  # else the port check below would find the other process
            raise RuntimeError(f"port {self.port} on {self.host} is already in use (another SuperLink?); "
                               "choose another --port or stop what listens there")
        log = self.log_path.open("ab")
        # its own session (a terminal's Ctrl-C goes to the coordinator, which stops it in order),
        # and SIGTERM from the kernel should the coordinator die without stopping it
        self.proc = subprocess.Popen(cmd, env=flower_env(self.flwr_home), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=die_with_parent)
        try:
            wait_for_port(dial_host(self.host).strip("[]"), self.port, timeout, self.proc)
        except (RuntimeError, TimeoutError) as err:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"the SuperLink did not start: {err}; last lines of {self.log_path}:\n  "
                               + "\n  ".join(tail)) from err
        if self.superexec:
            self._start_superexec()
        lines = ["[superlink]", f'default = "{self.connection}"', "", f"[superlink.{self.connection}]",
                 f'address = "{dial_host(self.host)}:{self.port}"']
        if self.tls is None:
            lines.append("insecure = true")
        else:
            lines += ["insecure = false", f'root-certificates = "{self.tls.ca_cert.resolve()}"']
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")
        return self

    def _start_superexec(self) -> None:
        """Start the SuperExec that runs this SuperLink's ServerApps, as Flower's SuperLink starts
        it in its default isolation mode but retrying an HTTP 500 ("database is locked") instead
        of exiting (:mod:`umeml.flower.superexec_main`). It leaves when the SuperLink exits
        (``--parent-pid``), and with the coordinator (its own session, the kernel's SIGTERM)."""
        address = f"{dial_host(self.host)}:{self.port}"
        certs = None if self.tls is None else str(self.tls.ca_cert)
        with self.log_path.open("ab") as log:
            self.superexec_proc = subprocess.Popen(superexec_command(address, self.proc.pid, certs),
                                                   env=flower_env(self.flwr_home), stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True,
                                                   preexec_fn=die_with_parent)

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

    def restart(self, timeout: float = 60.0) -> "SuperLink":
        """Start the SuperLink again on the same port and database (registered site keys and
        nodes kept), after it died."""
        self.stop()
        return self._launch(timeout)

    def check_alive(self) -> None:
        """Raise :class:`SuperLinkDied` when the SuperLink process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise SuperLinkDied(f"the SuperLink exited with code {self.proc.returncode} (see {self.log_path})")

    def stop(self) -> None:
        """Stop the SuperLink and its children."""
        if self.superexec_proc is not None:
            stop_process(self.superexec_proc)
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


class RunFailed(FederationError):
    """The Flower run ended in a state other than finished:completed."""


class SuperLinkDied(RunFailed):
    """The SuperLink process exited while a run was in progress."""


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
        link.check_alive()
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
            link.check_alive()
            if done_marker is not None and done_marker.exists():
                next_poll = min(next_poll, time.monotonic() + 1.0)
            time.sleep(tick)
    raise RunFailed(f"run {run_id} still {status} after {timeout:.0f} s")
