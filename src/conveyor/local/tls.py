"""A throwaway certificate authority for local mode's HTTPS endpoint.

Local mode serves the HTTP API over TLS so that clients exercise the same code path (``verify=``,
SigV4 over HTTPS) as against API Gateway. The CA's private key is never written to disk: nobody can
mint further certificates that the bundle would trust, and regenerating everything is cheap.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_BUNDLE_NAME = "ca.pem"
CERT_NAME = "server.pem"
KEY_NAME = "server-key.pem"

VALIDITY = dt.timedelta(days=30)
# Restarts reuse certificates only when they outlive a working session comfortably.
MIN_REMAINING = dt.timedelta(days=1)
# Tolerates a client clock slightly behind ours.
BACKDATE = dt.timedelta(minutes=5)
# ::1 is always included: "localhost" resolves to it first on many systems.
ALWAYS_INCLUDED_HOSTS = ("::1",)

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def make_certificates(
    directory: Path, hosts: Iterable[str] = ("localhost", "127.0.0.1")
) -> tuple[Path, Path, Path]:
    """Create (or reuse) a local CA and a server certificate signed by it.

    Parameters
    ----------
    directory : Path
        Where the PEM files live; created if missing.
    hosts : iterable of str
        Names and IP addresses the server certificate must cover, as SubjectAlternativeNames
        (IP addresses become ``IPAddress`` entries). ``::1`` is always added.

    Returns
    -------
    tuple of Path
        ``(ca_bundle_path, cert_path, key_path)``. Clients pass ``ca_bundle_path`` as ``verify=``;
        the server loads ``cert_path`` and ``key_path`` (mode 0600).

    Notes
    -----
    Existing files are reused when they still form a valid chain, cover every requested host and
    stay valid for at least another day, so a restarted local stack keeps working with clients
    that already hold the bundle. Otherwise everything is regenerated.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wanted = _normalise_hosts([*hosts, *ALWAYS_INCLUDED_HOSTS])
    paths = (directory / CA_BUNDLE_NAME, directory / CERT_NAME, directory / KEY_NAME)
    # Two local stacks starting at once must not interleave a CA from one with a leaf from the other.
    with _directory_lock(directory):
        if not _reusable(*paths, wanted=wanted, now=_utcnow()):
            _generate(*paths, wanted=wanted, now=_utcnow())
    return paths


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _normalise_hosts(hosts: Iterable[str]) -> tuple[list[str], list[_IPAddress]]:
    names: list[str] = []
    addresses: list[_IPAddress] = []
    for host in hosts:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if host.lower() not in names:
                names.append(host.lower())
        else:
            if address not in addresses:
                addresses.append(address)
    return names, addresses


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _reusable(
    ca_path: Path,
    cert_path: Path,
    key_path: Path,
    *,
    wanted: tuple[list[str], list[_IPAddress]],
    now: dt.datetime,
) -> bool:
    try:
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    if min(ca.not_valid_after_utc, cert.not_valid_after_utc) < now + MIN_REMAINING:
        return False
    if max(ca.not_valid_before_utc, cert.not_valid_before_utc) > now:
        return False
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        return False
    try:
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    names = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    addresses = set(san.get_values_for_type(x509.IPAddress))
    wanted_names, wanted_addresses = wanted
    return set(wanted_names) <= names and set(wanted_addresses) <= addresses


def _generate(
    ca_path: Path,
    cert_path: Path,
    key_path: Path,
    *,
    wanted: tuple[list[str], list[_IPAddress]],
    now: dt.datetime,
) -> None:
    # P-256 keys generate in microseconds, which keeps test fixtures and first starts fast.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "conveyor local mode"),
            x509.NameAttribute(NameOID.COMMON_NAME, "conveyor local CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    names, addresses = wanted
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alt_names += [x509.IPAddress(address) for address in addresses]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "conveyor local mode"),
                    x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else str(addresses[0])),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        # OpenSSL 3 strict verification (Python 3.13's default) rejects leaves without an AKI.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(key_path, key_pem, mode=0o600)
    _write_atomically(cert_path, server_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    _write_atomically(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Created with its final mode so the key is never readable by others, whatever the umask.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
