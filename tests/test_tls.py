"""Mutual TLS 1.3 for gRPC ingest and TLS 1.3 contexts for REST, over real loopback sockets."""

from __future__ import annotations

from common.tls import restrict_grpc_to_tls13

# gRPC reads its TLS 1.2 cipher list while it is imported: restrict first, import after.
from tests.tlsutil import Handshake, handshake

restrict_grpc_to_tls13()

import os  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from concurrent import futures  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
import pytest  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from common import pki  # noqa: E402
from common.errors import ConfigError, SecurityError  # noqa: E402
from common.tls import (  # noqa: E402
    GRPC_CIPHER_SUITES_VARIABLE,
    UNNEGOTIABLE_TLS12_SUITE,
    client_ssl_context,
    grpc_channel_credentials,
    grpc_server_credentials,
    peer_certificate_serial,
    peer_host_id,
    server_ssl_context,
)

ECHO = "/t.T/Echo"


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Path
    server: pki.CertPaths
    agent: pki.CertPaths


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    pki.init_ca(directory)
    return Pki(
        directory=directory,
        ca=directory / "ca.pem",
        server=pki.issue_server(directory, "localhost", ip_addresses=["127.0.0.1"]),
        agent=pki.issue_agent(directory, "host-a"),
    )


@dataclass
class EchoServer:
    port: int
    served: list[str]


@pytest.fixture(scope="module")
def echo_server(material: Pki) -> Iterator[EchoServer]:
    """A gRPC server on loopback that answers with the caller's host id and serial."""
    served: list[str] = []

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        auth = context.auth_context()
        answer = f"{peer_host_id(auth)} {peer_certificate_serial(auth)}"  # type: ignore[arg-type]
        served.append(answer)
        return answer.encode()

    handler = grpc.method_handlers_generic_handler(
        "t.T", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc_server_credentials(material.server.cert, material.server.key, material.ca)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield EchoServer(port=port, served=served)
    finally:
        server.stop(grace=None).wait()


def _call(port: int, credentials: grpc.ChannelCredentials) -> bytes:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        echo = channel.unary_unary(ECHO, None, None)
        answer: bytes = echo(b"", timeout=10)
        return answer


def _assert_refused(server: EchoServer, credentials: grpc.ChannelCredentials) -> None:
    served = list(server.served)
    with pytest.raises(grpc.RpcError) as raised:
        _call(server.port, credentials)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.served == served


def _issue_by_hand(
    material: Pki, directory: Path, *, not_before: datetime, not_after: datetime
) -> tuple[Path, Path]:
    """An agent certificate for host-a from the test CA, with the given validity."""
    ca_cert = x509.load_pem_x509_certificate(material.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(
        (material.directory / "ca.key").read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "host-a")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:meterd:host:host-a")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir()
    cert_path, key_path = directory / "agent.pem", directory / "agent.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# --- gRPC: who may connect ----------------------------------------------------------


def test_an_agent_with_a_valid_certificate_gets_its_own_host_id(
    material: Pki, echo_server: EchoServer
) -> None:
    credentials = grpc_channel_credentials(material.agent.cert, material.agent.key, material.ca)

    answer = _call(echo_server.port, credentials)

    assert answer.decode() == f"host-a {material.agent.serial}"


def test_a_client_without_a_certificate_is_refused(
    material: Pki, echo_server: EchoServer
) -> None:
    _assert_refused(echo_server, grpc.ssl_channel_credentials(material.ca.read_bytes()))


def test_a_client_with_a_certificate_from_another_ca_is_refused(
    material: Pki, echo_server: EchoServer, tmp_path: Path
) -> None:
    pki.init_ca(tmp_path, name="someone else's CA")
    stranger = pki.issue_agent(tmp_path, "host-a")
    credentials = grpc.ssl_channel_credentials(
        material.ca.read_bytes(), stranger.key.read_bytes(), stranger.cert.read_bytes()
    )

    _assert_refused(echo_server, credentials)


def test_a_client_presenting_a_server_certificate_is_refused(
    material: Pki, echo_server: EchoServer
) -> None:
    other = pki.issue_server(material.directory, "host-a")

    _assert_refused(echo_server, grpc_channel_credentials(other.cert, other.key, material.ca))


def test_an_expired_certificate_is_refused(
    material: Pki, echo_server: EchoServer, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    cert, key = _issue_by_hand(
        material, tmp_path / "expired", not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )

    _assert_refused(echo_server, grpc_channel_credentials(cert, key, material.ca))


def test_a_not_yet_valid_certificate_is_refused(
    material: Pki, echo_server: EchoServer, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    cert, key = _issue_by_hand(
        material, tmp_path / "future", not_before=now + timedelta(days=1),
        not_after=now + timedelta(days=30),
    )

    _assert_refused(echo_server, grpc_channel_credentials(cert, key, material.ca))


def test_a_hand_issued_certificate_with_current_validity_is_accepted(
    material: Pki, echo_server: EchoServer, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    cert, key = _issue_by_hand(
        material, tmp_path / "current", not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=1),
    )

    answer = _call(echo_server.port, grpc_channel_credentials(cert, key, material.ca))

    assert answer.decode().split() == ["host-a", str(pki.certificate_serial(cert.read_bytes()))]


# --- gRPC: TLS 1.3 only -------------------------------------------------------------


def _python_client(material: Pki, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = maximum
    context.load_verify_locations(cafile=material.ca)
    context.load_cert_chain(material.agent.cert, material.agent.key)
    context.set_alpn_protocols(["h2"])
    return context


def test_grpc_refuses_a_tls12_client_at_thehandshake(
    material: Pki, echo_server: EchoServer
) -> None:
    context = _python_client(material, ssl.TLSVersion.TLSv1_2)

    with (
        socket.create_connection(("127.0.0.1", echo_server.port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(raw, server_hostname="localhost")


def test_grpc_accepts_the_same_client_on_tls13(material: Pki, echo_server: EchoServer) -> None:
    context = _python_client(material, ssl.TLSVersion.TLSv1_3)

    with (
        socket.create_connection(("127.0.0.1", echo_server.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.3"
        assert tls.selected_alpn_protocol() == "h2"


# --- restrict_grpc_to_tls13 ---------------------------------------------------------


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != GRPC_CIPHER_SUITES_VARIABLE}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True,
        timeout=60, check=False,
    )


def test_restriction_overwrites_another_value_and_is_idempotent() -> None:
    result = _python(
        "import os\n"
        "from common.tls import restrict_grpc_to_tls13\n"
        "restrict_grpc_to_tls13()\n"
        "restrict_grpc_to_tls13()\n"
        f"print(os.environ[{GRPC_CIPHER_SUITES_VARIABLE!r}])\n",
        **{GRPC_CIPHER_SUITES_VARIABLE: "ECDHE-ECDSA-AES128-GCM-SHA256"},
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == UNNEGOTIABLE_TLS12_SUITE


def test_restriction_refuses_once_grpc_is_imported() -> None:
    result = _python(
        "import grpc\n"
        "from common.tls import restrict_grpc_to_tls13\n"
        "restrict_grpc_to_tls13()\n"
    )

    assert result.returncode != 0
    assert "SecurityError: cannot restrict gRPC to TLS 1.3" in result.stderr


def test_grpc_server_credentials_refuse_when_tls12_could_not_be_switched_off(
    material: Pki,
) -> None:
    result = _python(
        "import grpc\n"
        "from pathlib import Path\n"
        "from common.tls import grpc_server_credentials\n"
        f"grpc_server_credentials(Path({str(material.server.cert)!r}),"
        f" Path({str(material.server.key)!r}), Path({str(material.ca)!r}))\n"
    )

    assert result.returncode != 0
    assert "SecurityError: cannot restrict gRPC to TLS 1.3" in result.stderr


# --- key and identity checks --------------------------------------------------------


def test_grpc_credentials_refuse_a_key_others_can_read(material: Pki, tmp_path: Path) -> None:
    key = tmp_path / "agent.key"
    key.write_bytes(material.agent.key.read_bytes())
    key.chmod(0o640)

    with pytest.raises(SecurityError, match=f"{key} has mode 0640"):
        grpc_channel_credentials(material.agent.cert, key, material.ca)
    with pytest.raises(SecurityError, match=f"{key} has mode 0640"):
        grpc_server_credentials(material.agent.cert, key, material.ca)


def test_credentials_refuse_a_key_that_belongs_to_another_certificate(material: Pki) -> None:
    with pytest.raises(SecurityError, match="does not belong to certificate"):
        grpc_server_credentials(material.server.cert, material.agent.key, material.ca)


def test_credentials_refuse_a_ca_file_that_is_not_a_certificate(
    material: Pki, tmp_path: Path
) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")

    with pytest.raises(ConfigError, match=r"not a PEM X\.509 CA certificate"):
        grpc_channel_credentials(material.agent.cert, material.agent.key, bogus)


@pytest.mark.parametrize(
    "auth_context",
    [{}, {"transport_security_type": [b"ssl"]}, {"x509_pem_cert": []}],
)
def test_peer_identity_without_a_certificate_is_a_security_error(
    auth_context: dict[str, list[bytes]],
) -> None:
    with pytest.raises(SecurityError, match="no verified client certificate"):
        peer_host_id(auth_context)
    with pytest.raises(SecurityError, match="no verified client certificate"):
        peer_certificate_serial(auth_context)


# --- TLS contexts for the REST listener ---------------------------------------------


def _plain_client(material: Pki, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = maximum
    context.load_verify_locations(cafile=material.ca)
    return context


def test_rest_server_context_speaks_tls13(material: Pki) -> None:
    server = server_ssl_context(material.server.cert, material.server.key)

    result = handshake(server, _plain_client(material, ssl.TLSVersion.TLSv1_3))

    assert result == Handshake(server_error=None, client_version="TLSv1.3")


def test_rest_server_context_refuses_tls12(material: Pki) -> None:
    server = server_ssl_context(material.server.cert, material.server.key)

    result = handshake(server, _plain_client(material, ssl.TLSVersion.TLSv1_2))

    assert result.client_version is None
    assert isinstance(result.server_error, ssl.SSLError)
    assert result.server_error.reason == "UNSUPPORTED_PROTOCOL"


def test_rest_server_context_can_require_a_client_certificate(material: Pki) -> None:
    server = server_ssl_context(
        material.server.cert, material.server.key, material.ca, require_client_cert=True
    )

    with_cert = handshake(
        server, client_ssl_context(material.ca, material.agent.cert, material.agent.key)
    )
    without = handshake(server, client_ssl_context(material.ca))

    assert with_cert == Handshake(server_error=None, client_version="TLSv1.3")
    assert without.client_version is None
    assert isinstance(without.server_error, ssl.SSLError)
    assert without.server_error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


def test_requiring_client_certificates_needs_a_ca(material: Pki) -> None:
    with pytest.raises(ConfigError, match="needs a CA"):
        server_ssl_context(material.server.cert, material.server.key, require_client_cert=True)


def test_rest_client_context_refuses_a_tls12_server(material: Pki) -> None:
    tls12_only = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls12_only.maximum_version = ssl.TLSVersion.TLSv1_2
    tls12_only.load_cert_chain(material.server.cert, material.server.key)
    control = server_ssl_context(material.server.cert, material.server.key)

    assert handshake(control, client_ssl_context(material.ca)).client_version == "TLSv1.3"
    assert handshake(tls12_only, client_ssl_context(material.ca)).client_version is None


def test_rest_client_context_refuses_a_server_from_another_ca(
    material: Pki, tmp_path: Path
) -> None:
    pki.init_ca(tmp_path)
    stranger = pki.issue_server(tmp_path, "localhost")
    server = server_ssl_context(stranger.cert, stranger.key)

    assert handshake(server, client_ssl_context(material.ca)).client_version is None


def test_rest_client_context_needs_both_certificate_and_key(material: Pki) -> None:
    with pytest.raises(ConfigError, match="give both or neither"):
        client_ssl_context(material.ca, cert=material.agent.cert)
