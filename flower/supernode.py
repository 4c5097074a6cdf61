"""A site's Flower SuperNode: its command line, and what its output means when it is refused."""

from __future__ import annotations

import sys
from pathlib import Path


def supernode_command(server: str, port: int, site_config: Path, root_cert: Path | None = None,
                      auth_key: Path | None = None) -> list[str]:
    """The ``flower-supernode`` command line for a site."""
    # Flower's flower-supernode, with a SuperLink's transient HTTP 500 retried (fleet_retry.py)
    cmd = [sys.executable, "-m", "umeml.flower.fleet_retry", "--superlink", server, "--port", str(port),
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
