"""TLS for meterd: mutual TLS 1.3 for gRPC ingest, TLS 1.3 contexts for the REST API.

Every function that loads a private key first checks its file with
:func:`common.pki.check_private_key_file`, so a daemon refuses to start with a key
that group or others can read, and says which file and why.

``grpc`` is imported inside the functions that need it, never at module level: the
TLS 1.2 switch-off in :func:`restrict_grpc_to_tls13` only works when it runs before
``grpc`` is first imported, and importing this module must not spoil that.
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.errors import ConfigError, SecurityError
from common.pki import check_private_key_file, host_id_from_certificate, load_certificate

if TYPE_CHECKING:
    import grpc

GRPC_CIPHER_SUITES_VARIABLE = "GRPC_SSL_CIPHER_SUITES"
# A TLS 1.2 suite that can never be negotiated: no pre-shared key is ever configured.
UNNEGOTIABLE_TLS12_SUITE = "PSK-AES128-CBC-SHA"
PEER_CERTIFICATE_KEY = "x509_pem_cert"


def restrict_grpc_to_tls13() -> None:
    """Make every gRPC TLS handshake in this process (and its children) TLS 1.3 only.

    gRPC Python has no setting for the minimum TLS version, and by default it also
    accepts TLS 1.2. gRPC core takes its TLS 1.2 cipher list from the environment
    variable ``GRPC_SSL_CIPHER_SUITES``; TLS 1.3 suites are not governed by it. Setting
    it to ``PSK-AES128-CBC-SHA``, a suite that cannot be negotiated because no
    pre-shared key is ever configured, makes every TLS 1.2 handshake fail with
    NO_SHARED_CIPHER while TLS 1.3 handshakes go on as before.

    gRPC core reads the variable once, while ``grpc`` is being imported. So this must
    be called before anything imports ``grpc`` (and therefore before any gRPC
    credentials are created): first thing in each composition root, and at the top of
    the test suite's ``conftest.py``. If ``grpc`` has already been imported without the
    variable in place, the setting can no longer take effect and this raises
    :class:`SecurityError` instead of leaving TLS 1.2 silently enabled.

    Idempotent. A different value already in the environment is overwritten: TLS 1.3
    only is not negotiable. This is the one place in meterd that writes
    ``os.environ``; child processes inherit the setting.
    """
    if os.environ.get(GRPC_CIPHER_SUITES_VARIABLE) == UNNEGOTIABLE_TLS12_SUITE:
        return
    if "grpc" in sys.modules:
        raise SecurityError(
            "cannot restrict gRPC to TLS 1.3: grpc was imported before "
            "restrict_grpc_to_tls13() ran, and gRPC reads GRPC_SSL_CIPHER_SUITES only "
            "when it is imported"
        )
    os.environ[GRPC_CIPHER_SUITES_VARIABLE] = UNNEGOTIABLE_TLS12_SUITE


@dataclass(frozen=True, slots=True)
class _Identity:
    cert_pem: bytes
    key_pem: bytes


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read the {what}: {exc.strerror}") from None


def _read_ca(ca: Path) -> bytes:
    pem = _read(ca, "CA certificate")
    try:
        load_certificate(pem)
    except SecurityError:
        raise ConfigError(str(ca), "", "not a PEM X.509 CA certificate") from None
    return pem


def _read_identity(cert: Path, key: Path) -> _Identity:
    """Check and read a certificate and its private key; they must belong together."""
    check_private_key_file(key)
    cert_pem = _read(cert, "certificate")
    key_pem = _read(key, "private key")
    try:
        certificate = load_certificate(cert_pem)
    except SecurityError:
        raise ConfigError(str(cert), "", "not a PEM X.509 certificate") from None
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(str(key), "", "not an unencrypted PEM private key") from None
    if private_key.public_key() != certificate.public_key():
        raise SecurityError(f"private key {key} does not belong to certificate {cert}")
    return _Identity(cert_pem=cert_pem, key_pem=key_pem)


def grpc_server_credentials(cert: Path, key: Path, ca: Path) -> grpc.ServerCredentials:
    """Server credentials for mutual TLS: clients must present a certificate from ``ca``.

    Calls :func:`restrict_grpc_to_tls13`, so it raises :class:`SecurityError` rather
    than serve TLS 1.2 when ``grpc`` was imported before the restriction was in place.
    """
    restrict_grpc_to_tls13()
    identity = _read_identity(cert, key)
    ca_pem = _read_ca(ca)
    import grpc

    return grpc.ssl_server_credentials(
        [(identity.key_pem, identity.cert_pem)],
        root_certificates=ca_pem,
        require_client_auth=True,
    )


def grpc_channel_credentials(cert: Path, key: Path, ca: Path) -> grpc.ChannelCredentials:
    """Channel credentials for mutual TLS: present ``cert``, trust only servers from ``ca``.

    Like :func:`grpc_server_credentials`, it first makes sure TLS 1.2 is switched off.
    """
    restrict_grpc_to_tls13()
    identity = _read_identity(cert, key)
    ca_pem = _read_ca(ca)
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    _read_identity(cert, key)
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except ssl.SSLError as exc:
        raise SecurityError(f"cannot use certificate {cert} with key {key}: {exc}") from None


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    _read_ca(ca)
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(str(ca), "", f"cannot load the CA certificate: {exc}") from None


def server_ssl_context(
    cert: Path, key: Path, ca: Path | None = None, require_client_cert: bool = False
) -> ssl.SSLContext:
    """A TLS 1.3-only server context (for the aiohttp REST listener).

    With ``ca`` given, client certificates from that CA are verified when offered;
    ``require_client_cert=True`` makes one mandatory (and needs ``ca``).
    """
    if require_client_cert and ca is None:
        raise ConfigError(
            str(cert), "", "requiring client certificates needs a CA to verify them against"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    _load_chain(context, cert, key)
    if ca is not None:
        _load_ca(context, ca)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_ssl_context(
    ca: Path, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A TLS 1.3-only client context that trusts only servers certified by ``ca``.

    With ``cert`` and ``key`` (both or neither) it presents a client certificate.
    Host names are checked.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    _load_ca(context, ca)
    if cert is not None and key is not None:
        _load_chain(context, cert, key)
    elif cert is not None or key is not None:
        given = cert if cert is not None else key
        raise ConfigError(
            str(given), "", "a client certificate needs its private key: give both or neither"
        )
    return context


def _peer_certificate(auth_context: Mapping[str, Iterable[bytes]]) -> bytes:
    for pem in auth_context.get(PEER_CERTIFICATE_KEY, ()):
        return pem
    raise SecurityError("the peer presented no verified client certificate")


def peer_host_id(auth_context: Mapping[str, Iterable[bytes]]) -> str:
    """The host id of the agent on the other end of a gRPC call.

    ``auth_context`` is ``context.auth_context()`` of a gRPC servicer context (sync or
    asyncio). Its certificate has been verified against the CA in the handshake; the
    host id is read from it with :func:`common.pki.host_id_from_certificate`. Raises
    :class:`SecurityError` when no certificate is there or it names no valid host.
    """
    return host_id_from_certificate(_peer_certificate(auth_context))


def peer_certificate_serial(auth_context: Mapping[str, Iterable[bytes]]) -> int:
    """The serial number of the peer's verified client certificate (see peer_host_id)."""
    certificate: x509.Certificate = load_certificate(_peer_certificate(auth_context))
    return certificate.serial_number
