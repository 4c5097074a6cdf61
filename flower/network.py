"""Addresses of a SuperLink (``HOST:PORT``, bind-all -> dialed address) and its TLS probe."""

from __future__ import annotations

import socket
from pathlib import Path


def dial_host(host: str) -> str:
    """The address a local client dials for a SuperLink bound to ``host`` (bind-all -> loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


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
