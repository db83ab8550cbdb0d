"""The meterd certificate authority: a CA, agent client certificates, server certificates.

Keys are ECDSA P-256, signatures SHA-256. A PKI directory looks like this::

    DIR/ca.pem                  CA certificate (give it to every agent and collector)
    DIR/ca.key                  CA private key (mode 0600; keep it off the fleet)
    DIR/agents/<host_id>.pem    agent client certificate, identity = host id
    DIR/agents/<host_id>.key
    DIR/servers/<name>.pem      collector server certificate
    DIR/servers/<name>.key

An agent certificate names its host twice: as the subject common name (when the id
fits the 64 characters a common name may hold) and as the SAN URI
``urn:meterd:host:<host_id>``. The collector takes the host id from the verified
certificate, never from what the agent says about itself.

Private keys are created with mode 0600 from the first byte (``os.open`` with the mode,
then a rename into place), so no other user can ever read them; daemons refuse to use
a key that group or others can access (:func:`check_private_key_file`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError, SecurityError, ValidationError
from common.records import HOST_ID

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
AGENTS_DIR = "agents"
SERVERS_DIR = "servers"
HOST_URI_PREFIX = "urn:meterd:host:"

DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 825
# Certificates start a little in the past so that a host whose clock runs slightly
# behind the CA's still accepts them.
BACKDATE = timedelta(minutes=5)
MAX_COMMON_NAME = 64

_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME = re.compile(rf"(?=.{{1,253}}\Z){_DNS_LABEL}(?:\.{_DNS_LABEL})*")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class CertPaths:
    """Where a certificate and its private key were written, and its serial number."""

    cert: Path
    key: Path
    serial: int


# --- checks -------------------------------------------------------------------------


def check_private_key_file(path: Path) -> None:
    """Refuse a private key file that is missing, unreadable, or open to group/others.

    Raises :class:`SecurityError` naming the file and, for loose permissions, its mode.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SecurityError(f"private key {path} does not exist") from None
    except OSError as exc:
        raise SecurityError(f"private key {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SecurityError(f"private key {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise SecurityError(
            f"private key {path} has mode {mode:04o}: group and others must have no "
            f"access to it (fix with: chmod 600 {path})"
        )
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise SecurityError(f"private key {path} cannot be read: {exc.strerror}") from None


def validate_host_id(host_id: str) -> str:
    """Return ``host_id`` if it is a valid host id, else raise :class:`ValidationError`."""
    if not isinstance(host_id, str) or not HOST_ID.fullmatch(host_id):
        raise ValidationError(
            f"host id {host_id!r} is not valid: expected 1 to 128 letters, digits, '.', "
            "'_' or '-', starting with a letter or digit"
        )
    return host_id


def _validate_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValidationError(f"days {days!r} must be a whole number of days, at least 1")
    return days


def _parse_ip(value: str | IPAddress) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValidationError(f"{value!r} is not an IP address") from None


# --- reading certificates -----------------------------------------------------------


def load_certificate(pem: bytes) -> x509.Certificate:
    """Parse a PEM certificate; :class:`SecurityError` if it is not one."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise SecurityError(f"not a PEM X.509 certificate: {exc}") from None


def host_id_from_certificate(pem: bytes) -> str:
    """The host id an agent certificate speaks for.

    It is the SAN URI ``urn:meterd:host:<id>`` and the subject common name; when both
    are present they must agree. Raises :class:`SecurityError` when the certificate
    names no host, names more than one, or names one that is not a valid host id.
    """
    cert = load_certificate(pem)
    common_names = [
        attr.value for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    if len(common_names) > 1:
        raise SecurityError("certificate subject has more than one common name")
    common_name = common_names[0] if common_names else None
    if common_name is not None and not isinstance(common_name, str):
        raise SecurityError("certificate common name is not text")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        uri_ids: list[str] = []
    else:
        uri_ids = [
            uri.removeprefix(HOST_URI_PREFIX)
            for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
            if uri.startswith(HOST_URI_PREFIX)
        ]
    if len(uri_ids) > 1:
        raise SecurityError("certificate names more than one host in its SAN URIs")
    uri_id = uri_ids[0] if uri_ids else None
    if uri_id is not None and common_name is not None and uri_id != common_name:
        raise SecurityError(
            f"certificate common name {common_name!r} disagrees with its SAN URI host "
            f"{uri_id!r}"
        )
    host_id = uri_id if uri_id is not None else common_name
    if host_id is None:
        raise SecurityError("certificate names no host: no common name and no host SAN URI")
    if not HOST_ID.fullmatch(host_id):
        raise SecurityError(f"certificate names {host_id!r}, which is not a valid host id")
    return host_id


def certificate_serial(pem: bytes) -> int:
    """The serial number of a PEM certificate."""
    return load_certificate(pem).serial_number


def certificate_not_after(pem: bytes) -> datetime:
    """The end of a PEM certificate's validity, as an aware UTC datetime."""
    return load_certificate(pem).not_valid_after_utc


# --- writing files ------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, *, mode: int, replace: bool) -> None:
    """Write ``data`` to ``path`` atomically; the file has ``mode`` from its creation.

    The bytes go to a fresh temporary file created with ``mode`` (umask can only take
    bits away), are flushed to disk, and the file is then moved into place. With
    ``replace=False`` an existing ``path`` is never touched: :class:`FileExistsError`.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
    *, replace: bool,
) -> CertPaths:
    _write_file(key_path, _key_pem(key), mode=0o600, replace=replace)
    _write_file(cert_path, _cert_pem(cert), mode=0o644, replace=replace)
    return CertPaths(cert=cert_path, key=key_path, serial=cert.serial_number)


# --- the CA -------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def init_ca(directory: Path, *, name: str = "meterd CA", days: int = DEFAULT_CA_DAYS) -> CertPaths:
    """Create a new CA in ``directory``: ``ca.pem`` and ``ca.key`` (mode 0600).

    Refuses, with :class:`ConfigError`, to overwrite a CA that is already there:
    replacing it would orphan every certificate it issued.
    """
    _validate_days(days)
    if not name or len(name) > MAX_COMMON_NAME:
        raise ValidationError(f"CA name {name!r} must be 1 to {MAX_COMMON_NAME} characters")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    for existing in (cert_path, key_path):
        if existing.exists():
            raise ConfigError(
                str(directory), "",
                f"a CA already exists here ({existing.name}); refusing to overwrite it",
            )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=True, cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    try:
        return _write_pair(cert_path, key_path, cert, key, replace=False)
    except FileExistsError:
        raise ConfigError(
            str(directory), "", "a CA was created here concurrently; refusing to overwrite it"
        ) from None


@dataclass(frozen=True, slots=True)
class _CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _load_ca(directory: Path) -> _CA:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.is_file():
        raise ConfigError(
            str(cert_path), "", "no CA certificate here; create the CA first with `meterd pki init`"
        )
    check_private_key_file(key_path)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        raise ConfigError(str(cert_path), "", "not a PEM X.509 certificate") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(str(key_path), "", "not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(str(key_path), "", "not an ECDSA private key")
    if key.public_key() != cert.public_key():
        raise SecurityError(f"CA key {key_path} does not belong to CA certificate {cert_path}")
    return _CA(cert=cert, key=key)


def _issue(
    ca: _CA,
    *,
    common_name: str,
    san: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    public_key = key.public_key()
    now = _now()
    # A common name holds at most 64 characters; longer names live in the SAN only,
    # and a certificate with an empty subject must mark its SAN critical (RFC 5280).
    fits = len(common_name) <= MAX_COMMON_NAME
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if fits else [])
    not_after = min(now + timedelta(days=days), ca.cert.not_valid_after_utc)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=not fits)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


def issue_agent(directory: Path, host_id: str, *, days: int = DEFAULT_LEAF_DAYS) -> CertPaths:
    """Issue an agent client certificate for ``host_id`` from the CA in ``directory``.

    Writes ``agents/<host_id>.pem`` and ``agents/<host_id>.key`` (mode 0600), replacing
    an earlier pair for the same host (the earlier certificate stays valid until it
    expires). Extended key usage is client authentication only.
    """
    validate_host_id(host_id)
    _validate_days(days)
    ca = _load_ca(directory)
    cert, key = _issue(
        ca,
        common_name=host_id,
        san=[x509.UniformResourceIdentifier(HOST_URI_PREFIX + host_id)],
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        days=days,
    )
    out = directory / AGENTS_DIR
    out.mkdir(mode=0o700, exist_ok=True)
    return _write_pair(out / f"{host_id}.pem", out / f"{host_id}.key", cert, key, replace=True)


def issue_server(
    directory: Path,
    dns_name: str,
    *,
    days: int = DEFAULT_LEAF_DAYS,
    ip_addresses: Iterable[str | IPAddress] = (),
) -> CertPaths:
    """Issue a server certificate for ``dns_name`` from the CA in ``directory``.

    ``dns_name`` is a DNS name or an IP literal; ``ip_addresses`` adds IP SANs (for
    example 127.0.0.1). Writes ``servers/<dns_name>.pem`` and ``.key`` (mode 0600),
    replacing an earlier pair. Extended key usage is server authentication only.
    """
    _validate_days(days)
    san: list[x509.GeneralName] = []
    ips: list[IPAddress] = []
    try:
        ips.append(ipaddress.ip_address(dns_name))
    except ValueError:
        if not isinstance(dns_name, str) or not DNS_NAME.fullmatch(dns_name):
            raise ValidationError(
                f"{dns_name!r} is neither a DNS name (letters, digits and '-' in "
                "dot-separated labels) nor an IP address"
            ) from None
        san.append(x509.DNSName(dns_name))
    for value in ip_addresses:
        ip = _parse_ip(value)
        if ip not in ips:
            ips.append(ip)
    san.extend(x509.IPAddress(ip) for ip in ips)
    ca = _load_ca(directory)
    cert, key = _issue(
        ca, common_name=dns_name, san=san, usage=ExtendedKeyUsageOID.SERVER_AUTH, days=days
    )
    out = directory / SERVERS_DIR
    out.mkdir(mode=0o700, exist_ok=True)
    return _write_pair(out / f"{dns_name}.pem", out / f"{dns_name}.key", cert, key, replace=True)
