"""``meterd agent check``: find what would stop the agent before its unit is started.

Each check gives one :class:`Finding`: ``ok`` with what it saw, or a problem that says
what is wrong and what to do about it. The checks, in order:

- the configuration file loads;
- the private key exists, is readable, is an unencrypted PEM key and is closed to
  group and others (:func:`common.pki.check_private_key_file`);
- the certificate is readable, names a host and may be used by a client;
- the key belongs to the certificate;
- the CA certificate is readable;
- the certificate is valid now (neither expired nor not yet valid);
- the certificate was signed by the configured CA;
- the spool can be written (its folder, or the nearest folder the agent would
  create it in);
- the collector answers: a real TLS 1.3 handshake with the agent's certificate, the
  collector's certificate verified against the CA and the configured server name,
  and an HTTP/2 exchange that shows the collector accepted the agent's certificate.

A check whose inputs are broken is reported as skipped, which fails the run too.
Run it as the service user (``runuser -u meterd -- meterd agent check``) to see the
files as the service will.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.config import LoadedAgentConfig, load_agent_config
from agent.transport import split_target
from common.errors import MeterdError, SecurityError
from common.pki import check_private_key_file, host_id_from_certificate, load_certificate
from common.tls import client_ssl_context

DEFAULT_TIMEOUT_SECONDS = 5.0

# The client connection preface of HTTP/2 (RFC 9113 3.4) and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
H2_FRAME_HEADER_BYTES = 9
H2_SETTINGS = 4

# OpenSSL verification results the agent can do something about.
_HOSTNAME_MISMATCH = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_EXPIRED = {10}  # X509_V_ERR_CERT_HAS_EXPIRED
_NOT_YET_VALID = {9}  # X509_V_ERR_CERT_NOT_YET_VALID
_UNKNOWN_ISSUER = {2, 18, 19, 20, 21}  # unable to get issuer / self-signed / untrusted


@dataclass(frozen=True, slots=True)
class Finding:
    """The outcome of one check: ``status`` is ``ok``, ``problem`` or ``skipped``."""

    check: str
    status: Literal["ok", "problem", "skipped"]
    message: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def line(self) -> str:
        return f"{self.status:<8} {self.check}: {self.message}"


class _Problem(Exception):
    """A check failed; the message says what is wrong and what to do."""


T = TypeVar("T")


@dataclass
class _Run:
    findings: list[Finding] = field(default_factory=list)

    def attempt(self, check: str, body: Callable[[], tuple[T, str]]) -> T | None:
        """Run one check; its value, or ``None`` when it found a problem."""
        try:
            value, message = body()
        except _Problem as exc:
            self.findings.append(Finding(check, "problem", str(exc)))
            return None
        self.findings.append(Finding(check, "ok", message))
        return value

    def skip(self, check: str, needs: str) -> None:
        self.findings.append(Finding(check, "skipped", f"needs a usable {needs}"))


def run_checks(
    config_path: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    now: datetime | None = None,
) -> list[Finding]:
    """Run every check against the agent configuration at ``config_path``."""
    try:
        cfg = load_agent_config(config_path)
    except MeterdError as exc:
        return [
            Finding("configuration", "problem",
                    f"{exc} (every key and its default: meterd agent config-help)"),
            Finding("other checks", "skipped", "they need a configuration that loads"),
        ]
    at = now if now is not None else datetime.now(UTC)
    run = _Run([Finding("configuration", "ok", f"{config_path} loads")])
    tls = cfg.raw.tls
    key_path, cert_path, ca_path = cfg.path(tls.key), cfg.path(tls.cert), cfg.path(tls.ca)

    key = run.attempt("private key", lambda: _private_key(key_path))
    cert = run.attempt("certificate", lambda: _agent_certificate(cert_path))
    if key is not None and cert is not None:
        run.attempt("key and certificate", lambda: _pair(key, cert, key_path, cert_path))
    else:
        run.skip("key and certificate", "private key and certificate")
    ca = run.attempt("CA certificate", lambda: _ca_certificate(ca_path, at))
    if cert is not None:
        run.attempt("certificate validity", lambda: _validity(cert, cert_path, at))
    else:
        run.skip("certificate validity", "certificate")
    if cert is not None and ca is not None:
        run.attempt("certificate issuer", lambda: _issuer(cert, ca, cert_path, ca_path))
    else:
        run.skip("certificate issuer", "certificate and CA certificate")
    run.attempt("spool", lambda: (None, _spool_writable(cfg.path(cfg.raw.spool_path))))
    if key is not None and cert is not None and ca is not None:
        run.attempt(
            "collector",
            lambda: (None, _collector_answers(cfg, key_path, cert_path, ca_path, timeout)),
        )
    else:
        run.skip("collector", "private key, certificate and CA certificate")
    return run.findings


def _private_key(path: Path) -> tuple[PrivateKeyTypes, str]:
    try:
        check_private_key_file(path)
    except SecurityError as exc:
        raise _Problem(f"{exc}{_key_hint(path, str(exc))}") from None
    pem = _read(path, "private key", "the key issued for this host")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise _Problem(
            f"{path} is not an unencrypted PEM private key: copy the .key file that "
            "`meterd pki issue-agent` wrote for this host"
        ) from None
    mode = stat.S_IMODE(path.stat().st_mode)
    return key, f"{path} (mode {mode:04o})"


def _agent_certificate(path: Path) -> tuple[x509.Certificate, str]:
    cert = _load_pem_certificate(path, "certificate", "the certificate issued for this host")
    try:
        host_id = host_id_from_certificate(cert.public_bytes(serialization.Encoding.PEM))
    except SecurityError as exc:
        raise _Problem(f"{path}: {exc}: it is not an agent certificate") from None
    if not _allows_client_auth(cert):
        raise _Problem(
            f"{path} is not a client certificate (its extended key usage lacks clientAuth): "
            "use the agent certificate from `meterd pki issue-agent`"
        )
    return cert, f"{path} names host {host_id!r}"


def _pair(
    key: PrivateKeyTypes, cert: x509.Certificate, key_path: Path, cert_path: Path
) -> tuple[None, str]:
    if key.public_key() != cert.public_key():
        raise _Problem(
            f"private key {key_path} does not belong to certificate {cert_path}: copy the "
            "certificate and key issued together for this host"
        )
    return None, "the private key belongs to the certificate"


def _ca_certificate(path: Path, at: datetime) -> tuple[x509.Certificate, str]:
    ca = _load_pem_certificate(path, "CA certificate", "the fleet's CA certificate (ca.pem)")
    if ca.not_valid_after_utc < at:
        raise _Problem(f"CA certificate {path} expired on {_when(ca.not_valid_after_utc)}")
    return ca, f"{path} ({ca.subject.rfc4514_string()})"


def _validity(cert: x509.Certificate, path: Path, at: datetime) -> tuple[None, str]:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if end < at:
        raise _Problem(
            f"{path} expired on {_when(end)}: issue a new one with `meterd pki issue-agent "
            "DIR HOST_ID` and copy it and its key here"
        )
    if start > at:
        raise _Problem(
            f"{path} is not valid before {_when(start)} and this host's clock says "
            f"{_when(at)}: set the clock right (NTP) or wait"
        )
    return None, f"valid until {_when(end)} ({(end - at).days} days left)"


def _issuer(
    cert: x509.Certificate, ca: x509.Certificate, cert_path: Path, ca_path: Path
) -> tuple[None, str]:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise _Problem(
            f"{cert_path} (issued by {cert.issuer.rfc4514_string()}) was not signed by the "
            f"CA in {ca_path}: copy the CA certificate that issued it, or a certificate "
            "issued by this CA"
        ) from None
    return None, f"signed by the CA in {ca_path}"


def _read(path: Path, what: str, source: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _Problem(f"{what} {path} does not exist: copy {source} there") from None
    except OSError as exc:
        raise _Problem(
            f"{what} {path} cannot be read ({exc.strerror}): the service user must be able "
            f"to read it (fix with: chown meterd: {path})"
        ) from None


def _load_pem_certificate(path: Path, what: str, source: str) -> x509.Certificate:
    pem = _read(path, what, source)
    try:
        return load_certificate(pem)
    except SecurityError:
        raise _Problem(f"{what} {path} is not a PEM X.509 certificate") from None


def _key_hint(path: Path, message: str) -> str:
    if "does not exist" in message:
        return f": copy the host's key there (install -o meterd -g meterd -m 0600 KEY {path})"
    if "cannot be read" in message:
        return f": the service user must own it (fix with: chown meterd: {path})"
    return ""


def _allows_client_auth(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _spool_writable(spool: Path) -> str:
    """The spool file and its folder must take writes (SQLite adds -wal and -shm files)."""
    if spool.exists():
        if not spool.is_file():
            raise _Problem(f"spool {spool} exists but is not a regular file")
        if not os.access(spool, os.W_OK):
            raise _Problem(f"spool {spool} is not writable (fix with: chown meterd: {spool})")
    folder = spool.parent
    missing = False
    while not folder.exists() and folder.parent != folder:
        missing = True
        folder = folder.parent
    if not folder.is_dir():
        raise _Problem(
            f"spool {spool} cannot be created: {folder} is not a folder; set spool_path to "
            "a file in a folder the agent may write (default /var/lib/meterd/agent/spool.db)"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _Problem(
            f"spool folder {folder} is not writable by this user: chown meterd: {folder}, or "
            "set spool_path to a folder the agent may write"
        )
    if missing:
        return f"{spool} will be created: {folder} is writable"
    return f"{spool} can be written"


def _collector_answers(
    cfg: LoadedAgentConfig, key: Path, cert: Path, ca: Path, timeout: float
) -> str:
    host, port = split_target(cfg.raw.collector)
    name = cfg.raw.server_name or host
    try:
        context = client_ssl_context(ca, cert, key)
    except MeterdError as exc:
        raise _Problem(f"cannot build the TLS client: {exc}") from None
    context.set_alpn_protocols(["h2"])
    where = f"collector {cfg.raw.collector}"
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=name) as conn,
        ):
            version = conn.version()
            conn.sendall(H2_PREFACE)
            header = _receive(conn, H2_FRAME_HEADER_BYTES)
    except ssl.SSLCertVerificationError as exc:
        raise _Problem(
            _verification_problem(exc, where, name, host, port, (ca, cert, key), timeout)
        ) from None
    except ssl.SSLError as exc:
        raise _Problem(_tls_problem(exc, where, cert)) from None
    except TimeoutError:
        raise _Problem(
            f"{where} did not answer within {timeout:g} s: check the address, routes and "
            "firewalls between this host and the collector"
        ) from None
    except socket.gaierror as exc:
        raise _Problem(
            f"cannot resolve {host!r} ({exc.strerror}): fix `collector` in {cfg.source}"
        ) from None
    except ConnectionRefusedError:
        raise _Problem(
            f"{where} refused the connection: is the collector running and listening there? "
            f"(`collector` in {cfg.source})"
        ) from None
    except OSError as exc:
        raise _Problem(f"cannot reach {where}: {exc.strerror or exc}") from None
    if len(header) < H2_FRAME_HEADER_BYTES:
        raise _Problem(
            f"{where} closed the connection after the TLS handshake: it may have refused "
            f"this agent's certificate {cert}; see the collector's log"
        )
    if header[3] != H2_SETTINGS:
        raise _Problem(f"{where} does not speak gRPC (HTTP/2): is this the ingest port?")
    return f"{where} accepted this agent over {version}, verified as {name!r}"


def _receive(conn: ssl.SSLSocket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _verification_problem(
    exc: ssl.SSLCertVerificationError, where: str, name: str, host: str, port: int,
    tls: tuple[Path, Path, Path], timeout: float,
) -> str:
    ca, cert, key = tls
    code = exc.verify_code
    if code in _HOSTNAME_MISMATCH:
        names = _peer_names(host, port, ca, cert, key, timeout)
        carried = f" (it is valid for {names})" if names else ""
        return (
            f"{where} presented a certificate that is not valid for {name!r}{carried}: set "
            "server_name to a name it carries, or give the collector a certificate for "
            f"{name!r} (`meterd pki issue-server`)"
        )
    if code in _EXPIRED:
        return f"{where} presented an expired certificate: renew the collector's certificate"
    if code in _NOT_YET_VALID:
        return (
            f"{where} presented a certificate that is not valid yet: check this host's clock "
            "and the collector's"
        )
    if code in _UNKNOWN_ISSUER:
        return (
            f"{where} presented a certificate that the CA in {ca} did not sign: copy the CA "
            "certificate of this fleet"
        )
    return f"{where} presented a certificate that does not verify: {exc.verify_message}"


def _tls_problem(exc: ssl.SSLError, where: str, cert: Path) -> str:
    reason = (exc.reason or str(exc)).upper()
    if "ALERT" in reason and any(
        word in reason for word in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                                    "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED",
                                    "CERTIFICATE_REQUIRED", "DECRYPT_ERROR")
    ):
        return (
            f"{where} refused this agent's certificate {cert} ({exc.reason}): it must be "
            "issued by the CA the collector trusts, and be valid"
        )
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
        return f"{where} does not speak TLS: is this the gRPC ingest port?"
    if "PROTOCOL_VERSION" in reason:
        return f"{where} does not offer TLS 1.3, which meterd requires"
    return f"TLS with {where} failed: {exc.reason or exc}"


def _peer_names(host: str, port: int, ca: Path, cert: Path, key: Path, timeout: float) -> str:
    """The names in the collector's certificate, read in a second handshake that
    verifies the chain but not the name. Empty if that fails as well."""
    try:
        context = client_ssl_context(ca, cert, key)
        context.check_hostname = False
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw) as conn,
        ):
            der = conn.getpeercert(binary_form=True)
    except (OSError, MeterdError):
        return ""
    if not der:
        return ""
    try:
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except (ValueError, x509.ExtensionNotFound):
        return ""
    names = [f"DNS {n}" for n in san.get_values_for_type(x509.DNSName)]
    names += [f"IP {ip}" for ip in san.get_values_for_type(x509.IPAddress)]
    return ", ".join(names)
