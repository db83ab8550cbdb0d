"""The meterd PKI: CA, agent and server certificates, key file permissions, the CLI."""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import pki
from common.cli import main
from common.errors import ConfigError, SecurityError, ValidationError
from common.tls import client_ssl_context, server_ssl_context
from tests.tlsutil import handshake

# OpenSSL's verify result for a certificate whose extended key usage does not fit.
X509_V_ERR_INVALID_PURPOSE = 26


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init_ca(directory)
    return directory


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Let files be created as permissive as their creator asks."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


# --- the CA -------------------------------------------------------------------------


def test_init_ca_writes_a_self_signed_ca_certificate_and_its_key(tmp_path: Path) -> None:
    paths = pki.init_ca(tmp_path / "pki", name="Example CA", days=30)

    assert paths.cert == tmp_path / "pki" / "ca.pem"
    assert paths.key == tmp_path / "pki" / "ca.key"
    cert = _cert(paths.cert)
    assert cert.serial_number == paths.serial
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Example CA"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == cert.public_key()
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(cert)


def test_init_ca_refuses_to_overwrite_an_existing_ca(ca_dir: Path) -> None:
    before = {name: (ca_dir / name).read_bytes() for name in ("ca.pem", "ca.key")}

    with pytest.raises(ConfigError, match="refusing to overwrite"):
        pki.init_ca(ca_dir)

    assert {name: (ca_dir / name).read_bytes() for name in before} == before


def test_init_ca_refuses_when_only_the_ca_key_is_left(tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_bytes(b"an older key")
    (tmp_path / "ca.key").chmod(0o600)

    with pytest.raises(ConfigError, match=r"ca\.key"):
        pki.init_ca(tmp_path)

    assert (tmp_path / "ca.key").read_bytes() == b"an older key"
    assert not (tmp_path / "ca.pem").exists()


@pytest.mark.usefixtures("open_umask")
def test_private_keys_are_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    ca = pki.init_ca(directory)
    agent = pki.issue_agent(directory, "host-1")
    server = pki.issue_server(directory, "collector.example")

    assert [_mode(p.key) for p in (ca, agent, server)] == [0o600, 0o600, 0o600]
    assert [_mode(p.cert) for p in (ca, agent, server)] == [0o644, 0o644, 0o644]
    assert [p.name for p in directory.rglob("*") if p.name.endswith(".tmp")] == []


# --- agent certificates -------------------------------------------------------------


def test_issue_agent_names_the_host_and_allows_client_auth_only(ca_dir: Path) -> None:
    paths = pki.issue_agent(ca_dir, "web-01.dc2")

    assert paths.cert == ca_dir / "agents" / "web-01.dc2.pem"
    assert paths.key == ca_dir / "agents" / "web-01.dc2.key"
    cert = _cert(paths.cert)
    cert.verify_directly_issued_by(_cert(ca_dir / "ca.pem"))
    assert cert.serial_number == paths.serial
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web-01.dc2"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:meterd:host:web-01.dc2"
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


def test_each_certificate_gets_its_own_random_serial(ca_dir: Path) -> None:
    serials = [pki.issue_agent(ca_dir, "host-1").serial for _ in range(5)]
    serials.append(pki.certificate_serial((ca_dir / "ca.pem").read_bytes()))

    assert len(set(serials)) == len(serials)
    assert all(serial > 2**64 for serial in serials)


@pytest.mark.parametrize("host_id", ["host-1", "a", "A.b_c-9", "h" * 64, "h" * 128])
def test_host_id_round_trips_through_the_certificate(ca_dir: Path, host_id: str) -> None:
    paths = pki.issue_agent(ca_dir, host_id)

    assert pki.host_id_from_certificate(paths.cert.read_bytes()) == host_id


def test_a_host_id_too_long_for_a_common_name_lives_in_a_critical_san(ca_dir: Path) -> None:
    cert = _cert(pki.issue_agent(ca_dir, "h" * 65).cert)

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


@pytest.mark.parametrize(
    "host_id", ["", "-leading-dash", ".hidden", "a/b", "../up", "with space", "h" * 129, "x\n"]
)
def test_issue_agent_refuses_a_bad_host_id(ca_dir: Path, host_id: str) -> None:
    with pytest.raises(ValidationError, match="is not valid"):
        pki.issue_agent(ca_dir, host_id)

    assert not (ca_dir / "agents").exists()


def test_issue_agent_without_a_ca_says_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="meterd pki init"):
        pki.issue_agent(tmp_path, "host-1")


def test_issue_agent_refuses_a_ca_key_others_can_read(ca_dir: Path) -> None:
    (ca_dir / "ca.key").chmod(0o644)

    with pytest.raises(SecurityError, match=r"ca\.key has mode 0644"):
        pki.issue_agent(ca_dir, "host-1")


def test_agent_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path, days=10)

    agent = pki.issue_agent(tmp_path, "host-1", days=825)

    assert pki.certificate_not_after(agent.cert.read_bytes()) == pki.certificate_not_after(
        ca.cert.read_bytes()
    )


def test_certificate_not_after_is_aware_utc_days_ahead(ca_dir: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    paths = pki.issue_agent(ca_dir, "host-1", days=7)
    after = datetime.now(UTC)

    not_after = pki.certificate_not_after(paths.cert.read_bytes())

    assert not_after.utcoffset() == timedelta(0)
    assert before + timedelta(days=7) <= not_after <= after + timedelta(days=7)


# --- reading identities -------------------------------------------------------------


def _self_signed(names: list[x509.NameAttribute[str]], san: list[x509.GeneralName] | None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(names))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=not names)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_host_id_from_certificate_refuses_a_common_name_that_disagrees_with_the_san() -> None:
    pem = _self_signed(
        [x509.NameAttribute(NameOID.COMMON_NAME, "host-a")],
        [x509.UniformResourceIdentifier("urn:meterd:host:host-b")],
    )

    with pytest.raises(SecurityError, match="disagrees"):
        pki.host_id_from_certificate(pem)


def test_host_id_from_certificate_refuses_two_hosts_in_the_san() -> None:
    pem = _self_signed(
        [],
        [
            x509.UniformResourceIdentifier("urn:meterd:host:host-a"),
            x509.UniformResourceIdentifier("urn:meterd:host:host-b"),
        ],
    )

    with pytest.raises(SecurityError, match="more than one host"):
        pki.host_id_from_certificate(pem)


def test_host_id_from_certificate_reads_a_common_name_alone() -> None:
    pem = _self_signed([x509.NameAttribute(NameOID.COMMON_NAME, "host-a")], None)

    assert pki.host_id_from_certificate(pem) == "host-a"


@pytest.mark.parametrize(
    ("names", "san", "message"),
    [
        ([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")], None, "names no host"),
        ([x509.NameAttribute(NameOID.COMMON_NAME, "bad host")], None, "not a valid host id"),
    ],
)
def test_host_id_from_certificate_refuses_a_certificate_without_a_valid_host(
    names: list[x509.NameAttribute[str]], san: list[x509.GeneralName] | None, message: str
) -> None:
    with pytest.raises(SecurityError, match=message):
        pki.host_id_from_certificate(_self_signed(names, san))


def test_reading_garbage_as_a_certificate_is_a_security_error() -> None:
    with pytest.raises(SecurityError, match=r"not a PEM X\.509 certificate"):
        pki.host_id_from_certificate(b"-----BEGIN CERTIFICATE-----\nnope\n")


# --- server certificates ------------------------------------------------------------


def test_issue_server_names_dns_and_ips_and_allows_server_auth_only(ca_dir: Path) -> None:
    paths = pki.issue_server(ca_dir, "collector.example", ip_addresses=["127.0.0.1", "::1"])

    assert paths.cert == ca_dir / "servers" / "collector.example.pem"
    assert _mode(paths.key) == 0o600
    cert = _cert(paths.cert)
    cert.verify_directly_issued_by(_cert(ca_dir / "ca.pem"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["collector.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_issue_server_for_an_ip_literal_uses_an_ip_san(ca_dir: Path) -> None:
    cert = _cert(pki.issue_server(ca_dir, "10.0.0.7").cert)

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]


@pytest.mark.parametrize("name", ["", "bad name", "-x.example", "a/b", "x" * 64 + ".example"])
def test_issue_server_refuses_a_bad_dns_name(ca_dir: Path, name: str) -> None:
    with pytest.raises(ValidationError, match="neither a DNS name"):
        pki.issue_server(ca_dir, name)


def test_issue_server_refuses_a_bad_extra_ip(ca_dir: Path) -> None:
    with pytest.raises(ValidationError, match="not an IP address"):
        pki.issue_server(ca_dir, "collector.example", ip_addresses=["300.1.2.3"])


# --- private key permissions --------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o601, 0o610])
def test_check_private_key_file_refuses_group_or_other_access(
    ca_dir: Path, mode: int
) -> None:
    key = pki.issue_agent(ca_dir, "host-1").key
    key.chmod(mode)

    with pytest.raises(SecurityError) as raised:
        pki.check_private_key_file(key)

    assert str(key) in str(raised.value)
    assert f"mode {mode:04o}" in str(raised.value)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_check_private_key_file_accepts_an_owner_only_key(ca_dir: Path, mode: int) -> None:
    key = pki.issue_agent(ca_dir, "host-1").key
    key.chmod(mode)

    pki.check_private_key_file(key)


def test_check_private_key_file_refuses_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "agent.key"

    with pytest.raises(SecurityError, match=f"{missing} does not exist"):
        pki.check_private_key_file(missing)


def test_check_private_key_file_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="not a regular file"):
        pki.check_private_key_file(tmp_path)


# --- extended key usage in a real handshake -----------------------------------------


def _server_side_handshake_error(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> OSError | None:
    """Run one TLS handshake on loopback; the server's error, or None if it succeeded."""
    return handshake(server, client).server_error


def test_only_an_agent_certificate_passes_as_a_client_certificate(ca_dir: Path) -> None:
    server_paths = pki.issue_server(ca_dir, "localhost")
    agent = pki.issue_agent(ca_dir, "host-1")
    other_server = pki.issue_server(ca_dir, "other.example")
    ca = ca_dir / "ca.pem"
    server = server_ssl_context(server_paths.cert, server_paths.key, ca, require_client_cert=True)

    accepted = _server_side_handshake_error(
        server, client_ssl_context(ca, agent.cert, agent.key)
    )
    refused = _server_side_handshake_error(
        server, client_ssl_context(ca, other_server.cert, other_server.key)
    )

    assert accepted is None
    assert isinstance(refused, ssl.SSLCertVerificationError)
    assert refused.verify_code == X509_V_ERR_INVALID_PURPOSE


# --- the CLI ------------------------------------------------------------------------


def test_cli_creates_a_ca_and_issues_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "pki"

    assert main(["pki", "init", str(directory), "--days", "30", "--name", "Ops CA"]) == 0
    assert main(["pki", "issue-agent", str(directory), "host-7", "--days", "5"]) == 0
    assert main(
        ["pki", "issue-server", str(directory), "collector.example", "--ip", "127.0.0.1"]
    ) == 0

    out = capsys.readouterr().out
    for path in (
        directory / "ca.pem",
        directory / "ca.key",
        directory / "agents" / "host-7.pem",
        directory / "agents" / "host-7.key",
        directory / "servers" / "collector.example.pem",
        directory / "servers" / "collector.example.key",
    ):
        assert str(path) in out
        assert path.is_file()
    agent_pem = (directory / "agents" / "host-7.pem").read_bytes()
    assert pki.host_id_from_certificate(agent_pem) == "host-7"
    assert f"serial: {pki.certificate_serial(agent_pem):x}" in out
    server = _cert(directory / "servers" / "collector.example.pem")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_cli_bad_host_id_is_one_clear_line_and_exit_1(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["pki", "issue-agent", str(ca_dir), "not/a host"])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("meterd: error: host id 'not/a host' is not valid")
    assert not (ca_dir / "agents").exists()


def test_cli_refuses_to_overwrite_a_ca(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (ca_dir / "ca.key").read_bytes()

    code = main(["pki", "init", str(ca_dir)])

    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert "a CA already exists here" in err
    assert (ca_dir / "ca.key").read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["issue-agent", "DIR", "host-1", "--days", "0"], "must be at least 1 day"),
        (["issue-server", "DIR", "collector.example", "--ip", "nope"], "not an IP address"),
    ],
)
def test_cli_bad_option_is_a_one_line_usage_error(
    ca_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    args = [str(ca_dir) if arg == "DIR" else arg for arg in argv]

    with pytest.raises(SystemExit) as exited:
        main(["pki", *args])

    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.count("\n") == 1
    assert message in err
