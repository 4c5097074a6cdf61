"""``umeml-server certs``: the key material of a TLS + SuperNode-authenticated deployment.

Writes, under one folder:

- ``ca.crt`` / ``ca.key``: a private certificate authority (EC P-384). Sites get ``ca.crt`` only
  (``umeml-client start --root-certificates ca.crt``); ``ca.key`` stays with the coordinator,
  preferably offline.
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, whose subject
  alternative names hold ``127.0.0.1``, ``::1``, ``localhost`` and every ``--host`` (the names and
  addresses the sites dial). Flower's own SuperExec dials the SuperLink at the ``--host`` given to
  ``umeml-server start``, so that address must be in the SAN too.
- ``sites/<site>`` / ``sites/<site>.pub``: one EC P-384 key pair per site in OpenSSH format (what
  ``ssh-keygen -t ecdsa -b 384`` writes), the format Flower's ``--auth-supernode-private-key`` and
  ``flwr supernode register`` read. These keys are not signed by the CA: SuperNode
  authentication compares a node's signing key with the public keys registered at the SuperLink.

Private keys are created with mode 0600 (never world-readable, not even briefly). Existing files
are never overwritten unless ``force`` is set.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from umeml.errors import UmemlError

LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")
SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CertError(UmemlError):
    """The key material cannot be written as asked (existing files, bad names)."""


@dataclass
class CertBundle:
    """Paths written by :func:`create_certs`."""

    out: Path
    ca_cert: Path | None = None
    ca_key: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    site_keys: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # site -> (private, public)
    san: list[str] = field(default_factory=list)

    def written(self) -> list[Path]:
        """Every file written, in order."""
        paths = [self.ca_cert, self.ca_key, self.server_cert, self.server_key]
        for private, public in self.site_keys.values():
            paths += [private, public]
        return [p for p in paths if p is not None]


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    """Write ``data``; private files are created 0600 from the start (no chmod window)."""
    if path.exists() or path.is_symlink():
        if not force:
            raise CertError(f"{path} exists; pass --force to overwrite it")
        path.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600 if private else 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600 if private else 0o644)  # umask may have narrowed the public files


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san_entries(hosts: list[str]) -> tuple[list[x509.GeneralName], list[str]]:
    names: list[x509.GeneralName] = []
    shown: list[str] = []
    for host in [*LOOPBACK_NAMES, *hosts]:
        host = host.strip()
        if not host or host in shown:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            shown.append(host)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]{0,251}[A-Za-z0-9])?", host):
                raise CertError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
            shown.append(host)
    return names, shown


def check_site_ids(sites: list[str]) -> list[str]:
    """Site ids usable as file names (letters, digits, '.', '_', '-'); duplicates refused."""
    bad = [s for s in sites if not SITE_ID.match(s)]
    if bad:
        raise CertError(f"site id(s) {bad} are not usable as key file names (letters, digits, '.', '_', '-')")
    if len(set(sites)) != len(sites):
        raise CertError(f"duplicate site ids in {sites}")
    return list(sites)


def site_key_pair(site: str) -> tuple[bytes, bytes]:
    """An EC P-384 key pair in OpenSSH format: (private key file, ``.pub`` line)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" umeml-site-{site}\n".encode()


def create_certs(out: str | Path, sites: list[str], hosts: list[str] | None = None, force: bool = False,
                 keys_only: bool = False, server_only: bool = False, days: int = 825,
                 ca_days: int = 3650) -> CertBundle:
    """Create the CA, the SuperLink certificate and the sites' keys under ``out``.

    With ``keys_only`` only the sites' key pairs are written (a new site, or a site's key
    rotation); the CA and server certificate are left alone. With ``server_only`` the existing
    CA (``ca.crt`` / ``ca.key``) issues a new SuperLink certificate (renewal, another host name)
    and the sites keep trusting it. Every target is checked before anything is written, so a
    refusal leaves the folder as it was.
    """
    out = Path(out)
    if keys_only and server_only:
        raise CertError("--keys-only and --server-only exclude each other")
    sites = check_site_ids(sites)
    san_names, san_shown = _san_entries(list(hosts or []))
    targets = _targets(out, sites, keys_only, server_only)
    existing = [str(p) for p in targets if p.exists() or p.is_symlink()]
    if existing and not force:
        raise CertError("refusing to overwrite existing key material (pass --force to replace it): "
                        + ", ".join(existing))
    out.mkdir(parents=True, exist_ok=True)
    bundle = CertBundle(out, san=san_shown)
    if not keys_only:
        now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
        ca_cert, ca_key = _existing_ca(out) if server_only else _new_ca(now, ca_days)
        server_key, server_cert = _server_certificate(ca_cert, ca_key, san_names, now, days)
        bundle.server_key, bundle.server_cert = out / "server.key", out / "server.pem"
        if not server_only:
            bundle.ca_key, bundle.ca_cert = out / "ca.key", out / "ca.crt"
            _write(bundle.ca_key, _pem_key(ca_key), True, force)
            _write(bundle.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), False, force)
        _write(bundle.server_key, _pem_key(server_key), True, force)
        _write(bundle.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), False, force)
    if sites:
        (out / "sites").mkdir(exist_ok=True)
    for s in sites:
        private, public = site_key_pair(s)
        pair = (out / "sites" / s, out / "sites" / f"{s}.pub")
        _write(pair[0], private, True, force)
        _write(pair[1], public, False, force)
        bundle.site_keys[s] = pair
    return bundle


def _targets(out: Path, sites: list[str], keys_only: bool, server_only: bool) -> list[Path]:
    """The files :func:`create_certs` will write (``server_only`` needs the existing CA)."""
    if keys_only:
        targets = []
    elif server_only:
        missing = [str(p) for p in (out / "ca.crt", out / "ca.key") if not p.is_file()]
        if missing:
            raise CertError(f"--server-only needs the existing CA: {', '.join(missing)} not found")
        targets = [out / "server.pem", out / "server.key"]
    else:
        targets = [out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key"]
    for s in sites:
        targets += [out / "sites" / s, out / "sites" / f"{s}.pub"]
    return targets


def _existing_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in ``out`` (``ca.crt`` and the ``ca.key`` that belongs to it)."""
    ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    if ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers():
        raise CertError(f"{out / 'ca.key'} does not belong to {out / 'ca.crt'}")
    return ca_cert, ca_key


def _new_ca(now: dt.datetime, ca_days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA (EC P-384) that may sign end-entity certificates only."""
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "umeml federation"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "umeml federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return ca_cert, ca_key


def _server_certificate(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                        san_names: list[x509.GeneralName], now: dt.datetime,
                        days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's key and its certificate for ``san_names``, issued by the CA."""
    try:  # the issuer's own key identifier, so that chain building finds it
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "umeml federation"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, "umeml SuperLink")]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return server_key, server_cert


def certificate_names(cert_path: str | Path) -> list[str]:
    """The DNS names and IP addresses (as text) in a PEM certificate's subject alternative names."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(a) for a in san.get_values_for_type(x509.IPAddress))]


def names_host(names: list[str], host: str) -> bool:
    """Whether a certificate with SAN ``names`` is valid for ``host`` (bind-all: dialed as loopback)."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        return ipaddress.ip_address(host) in {ipaddress.ip_address(n) for n in names if _is_ip(n)}
    except ValueError:
        host = host.lower()
        return any(n.lower() == host or (n.startswith("*.") and host.split(".", 1)[-1] == n[2:].lower()
                                         and host.count(".") == n.count("."))
                   for n in names if not _is_ip(n))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
