"""``umeml-client start`` and ``umeml-client check``: join a federation, check a site's data."""

from __future__ import annotations

import argparse
import collections
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

from umeml.client.refusal import REFUSED_EXIT
from umeml.config import SiteConfig, load_config, load_site_config
from umeml.errors import ConfigError, DataValidationError, report_input_error


def load_site_cohort(site: SiteConfig, experiment: Path | None = None, site_file: Path | None = None):
    """The site's cohort as a run of ``experiment`` reads it: with that experiment's data section,
    by the same :meth:`CohortSource.load` the ClientApp calls for every run (defaults without
    ``experiment``), and every bag's features scanned for NaN/Inf (which a run would only meet
    mid-way). Raises DataValidationError listing every problem; a missing path is named as the
    key of ``site_file``."""
    cfg = load_config(experiment) if experiment is not None else None
    names = {k: f"{site_file}: {k}" for k in ("data_dir", "table", "signatures", "bags")} if site_file else None
    return site.cohort_source.load(cfg and cfg.data, cfg and cfg.tasks, scan_features=True, names=names)


def _cmd_check(args: argparse.Namespace) -> int:
    site = None
    try:
        site = load_site_config(args.site)
        cohort = load_site_cohort(site, args.config, args.site)
    except (ConfigError, DataValidationError, FileNotFoundError) as err:
        return report_input_error(err, f"check FAILED for site {site.site_id}" if site else "check FAILED")
    s = cohort.summary()
    print(f"site {site.site_id}: check OK: {s['patients']} patients, {s['slides']} slides; "
          f"pathology {s['with_pathology']}, genomics {s['with_genomics']}; feature dim {s['feature_dim'] or '-'}")
    if s["labels_needed"]:
        print("subtypes: " + ", ".join(f"{k}={v}" for k, v in s["subtype_counts"].items()))
    else:
        print("subtypes: none (not needed by the tasks)")
    if args.config is None:
        print("note: checked with the default data settings; a run reads the data with its experiment's data "
              "section (give --config EXPERIMENT.yaml to check with it)", file=sys.stderr)
    return 0


def check_auth_files(root_certificates: Path | None, auth_key: Path | None) -> str | None:
    """Why the TLS / key files cannot work (None when they can), checked before Flower starts."""
    if auth_key is not None and root_certificates is None:
        return "--auth-key needs --root-certificates (Flower authenticates sites only over TLS)"
    if root_certificates is not None:
        if not root_certificates.is_file():
            return f"--root-certificates {root_certificates} not found"
        if b"BEGIN CERTIFICATE" not in root_certificates.read_bytes():
            return f"--root-certificates {root_certificates} is not a PEM certificate (give the coordinator's ca.crt)"
    if auth_key is not None:
        if not auth_key.is_file():
            return f"--auth-key {auth_key} not found"
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key

        try:
            key = load_ssh_private_key(auth_key.read_bytes(), None)
        except (ValueError, TypeError) as err:
            return (f"--auth-key {auth_key} is not an unencrypted OpenSSH private key ({err}); give the private key, "
                    f"not the .pub")
        except UnsupportedAlgorithm as err:
            return f"--auth-key {auth_key}: {err}"
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            return f"--auth-key {auth_key} is not an EC key (Flower needs ECDSA on a NIST curve, e.g. P-384)"
    return None


def _cmd_start(args: argparse.Namespace) -> int:
    from umeml.flower.network import probe_superlink
    from umeml.flower.processes import flower_env
    from umeml.flower.supernode import supernode_command

    try:
        site = load_site_config(args.site)
        load_site_cohort(site, args.config, args.site)  # refuse to join with data that would fail mid-run
    except (ConfigError, DataValidationError, FileNotFoundError) as err:
        return report_input_error(err, "site data check FAILED, not joining")
    problem = check_auth_files(args.root_certificates, args.auth_key)
    if problem is None:
        try:  # a TLS mismatch would leave Flower's SuperNode retrying forever: catch it up front
            problem = probe_superlink(args.server, args.root_certificates)
        except ValueError as err:
            problem = f"--server: {err}"
    if problem:
        print(f"error: site {site.site_id}: {problem}", file=sys.stderr)
        return 2
    if args.auth_key is not None and os.stat(args.auth_key).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: site {site.site_id}: private key {args.auth_key} is readable by other users "
              f"(chmod 600 it)", file=sys.stderr)
    state = Path(site.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    cmd = supernode_command(args.server, args.port, args.site, args.root_certificates, args.auth_key)
    env, runtime = polling_env(flower_env(state / "flower"), args.idle_poll, args.reply_poll, args.busy_poll), None
    if args.runtime == "resident":
        from umeml.client.warm import start_resident
        from umeml.flower.clientapp_main import clientapp_command

        # the fallback while the resident restarts: Flower's flwr-clientapp with the short pull backoff
        runtime, env = start_resident(site.site_id, args.site, args.config, state / "resident.log", env,
                                      clientapp_command())
    try:
        return _run_supernode(cmd, env, site, args)
    finally:
        if runtime is not None:
            runtime.stop()


def polling_env(env: dict[str, str], idle: float, reply: float, busy: float | None = None) -> dict[str, str]:
    """``env`` with the tuned SuperNode's polling intervals (:mod:`umeml.flower.supernode_main`)."""
    from umeml.flower.supernode_main import BUSY_ENV, DEFAULT_BUSY_POLL_S, IDLE_ENV, REPLY_ENV

    return {**env, IDLE_ENV: str(idle), REPLY_ENV: str(reply), BUSY_ENV: str(DEFAULT_BUSY_POLL_S if busy is None else busy)}


def _run_supernode(cmd: list[str], env: dict[str, str], site: SiteConfig, args: argparse.Namespace) -> int:
    """Run the SuperNode until it exits, passing its output through; explain a refusal."""
    from umeml.flower.supernode import explain_supernode_failure

    mode = "TLS" if args.root_certificates else "insecure"
    if args.auth_key is not None:
        mode += ", site key " + str(args.auth_key)
    print(f"site {site.site_id}: joining {args.server} ({mode})", flush=True)
    # the SuperNode's output is passed through and its tail kept, to explain a refusal in our words
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def forward(signum, _frame):
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    tail: collections.deque[str] = collections.deque(maxlen=200)

    def pump() -> None:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)

    # The SuperNode's own SuperExec child inherits the pipe and only exits once it sees the
    # SuperNode gone, which needs the SuperNode reaped: wait on the process, not on the pipe.
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    refused = _watch_refusal(site.site_id, Path(site.state_dir), proc)
    rc = proc.wait()
    reader.join(timeout=15)
    if refused:
        return REFUSED_EXIT
    if rc != 0:
        reason = explain_supernode_failure(site.site_id, args.server, "".join(tail), args.auth_key)
        print(f"error: {reason}" if reason else f"error: site {site.site_id}: the SuperNode exited with code {rc}",
              file=sys.stderr)
    return rc


def _watch_refusal(site_id: str, state: Path, proc: subprocess.Popen) -> list[str]:
    """Stop the SuperNode once the coordinator refuses this site; the list gets the reason."""
    from umeml.client.refusal import watch_refusal

    refused: list[str] = []

    def on_refused(reason: str) -> None:
        refused.append(reason)
        print(f"error: site {site_id}: the coordinator refused this site: {reason}", file=sys.stderr, flush=True)
        proc.terminate()

    watch_refusal(state, on_refused)
    return refused


EXPERIMENT_HELP = ("the coordinator's experiment YAML: the site's data is checked with its data section, "
                   "as the run will read it (default data settings without it)")


def add_site_parsers(sub) -> None:
    """Register ``start`` and ``check`` on the ``umeml-client`` subparsers."""
    p = sub.add_parser("check", help="validate this site's data (every problem at once)")
    p.add_argument("--site", type=Path, required=True, help="site YAML (see configs/site.example.yaml)")
    p.add_argument("--config", type=Path, help=EXPERIMENT_HELP)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("start", help="join a federation: run Flower's SuperNode for this site")
    p.add_argument("--site", type=Path, required=True, help="site YAML (see configs/site.example.yaml)")
    p.add_argument("--config", type=Path, help=EXPERIMENT_HELP + "; used for the check before joining")
    p.add_argument("--server", required=True, help="the coordinator's SuperLink, HOST:PORT")
    p.add_argument("--port", type=int, default=9094, help="this SuperNode's local API port (default 9094; one per node)")
    p.add_argument("--root-certificates", type=Path, help="CA certificate of the coordinator (TLS on)")
    p.add_argument("--auth-key", type=Path, help="this site's private key (OpenSSH EC) registered at the coordinator")
    p.add_argument("--runtime", choices=("resident", "per-message"), default="resident",
                   help="resident (default): one warm process serves every message; per-message: Flower's own "
                        "flwr-clientapp process for each message")
    p.add_argument("--idle-poll", type=_seconds, default=1.0, metavar="SECONDS",
                   help="pause after a poll of the coordinator finds no message (default 1; Flower's own: 3)")
    p.add_argument("--busy-poll", type=_seconds, default=0.25, metavar="SECONDS",
                   help="that pause during a run: within 60 s of the last message served (default 0.25; "
                        "at most --idle-poll)")
    p.add_argument("--reply-poll", type=_seconds, default=0.05, metavar="SECONDS",
                   help="pause between checks for the ClientApp's reply (default 0.05; Flower's own: 0.5)")
    p.set_defaults(func=_cmd_start)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.01 <= value <= 60:
        raise argparse.ArgumentTypeError(f"{text} s: must be between 0.01 and 60 seconds")
    return value
