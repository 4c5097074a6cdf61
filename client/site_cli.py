"""``umeml-client start`` and ``umeml-client check``: join a federation, check a site's data."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from umeml.config import SiteConfig, load_site_config
from umeml.errors import ConfigError, DataValidationError


def load_site_cohort(site: SiteConfig):
    """The site's cohort, validated (raises DataValidationError listing every problem)."""
    from umeml.data.cohort import load_cohort, load_data_dir

    if site.data_dir:
        return load_data_dir(site.data_dir)
    return load_cohort(site.table, site.signatures, site.bags)


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        site = load_site_config(args.site)
        cohort = load_site_cohort(site)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (DataValidationError, FileNotFoundError) as err:
        print(f"check FAILED for site {getattr(locals().get('site'), 'site_id', '?')}: {err}", file=sys.stderr)
        return 1
    s = cohort.summary()
    print(f"site {site.site_id}: check OK: {s['patients']} patients, {s['slides']} slides; "
          f"pathology {s['with_pathology']}, genomics {s['with_genomics']}; feature dim {s['feature_dim'] or '-'}")
    print("subtypes: " + ", ".join(f"{k}={v}" for k, v in s["subtype_counts"].items()))
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    from umeml.server.deploy import flower_env, supernode_command

    try:
        site = load_site_config(args.site)
        load_site_cohort(site)  # refuse to join with data that would fail mid-run
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (DataValidationError, FileNotFoundError) as err:
        print(f"site data check FAILED, not joining: {err}", file=sys.stderr)
        return 1
    state = Path(site.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    cmd = supernode_command(args.server, args.port, args.site, args.root_certificates, args.auth_key)
    print(f"site {site.site_id}: joining {args.server} ({'TLS' if args.root_certificates else 'insecure'})", flush=True)
    proc = subprocess.Popen(cmd, env=flower_env(state / "flower"))

    def forward(signum, _frame):
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return proc.wait()


def add_site_parsers(sub) -> None:
    """Register ``start`` and ``check`` on the ``umeml-client`` subparsers."""
    p = sub.add_parser("check", help="validate this site's data (every problem at once)")
    p.add_argument("--site", type=Path, required=True, help="site YAML (see configs/site.example.yaml)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("start", help="join a federation: run Flower's SuperNode for this site")
    p.add_argument("--site", type=Path, required=True, help="site YAML (see configs/site.example.yaml)")
    p.add_argument("--server", required=True, help="the coordinator's SuperLink, HOST:PORT")
    p.add_argument("--port", type=int, default=9094, help="this SuperNode's local API port (default 9094; one per node)")
    p.add_argument("--root-certificates", type=Path, help="CA certificate of the coordinator (TLS on)")
    p.add_argument("--auth-key", type=Path, help="this site's private key (OpenSSH EC) registered at the coordinator")
    p.set_defaults(func=_cmd_start)
