"""``meterd agent check`` against real files and a real collector over mTLS."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.check import Finding, run_checks
from common import pki
from tests.harness import CollectorProcess, collector_config, meterd


@pytest.fixture(scope="module")
def collector(
    tmp_path_factory: pytest.TempPathFactory, pki_dir: Path
) -> Iterator[CollectorProcess]:
    proc = CollectorProcess(collector_config(tmp_path_factory.mktemp("collector"), pki_dir))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def enrol(tmp_path: Path, pki_dir: Path, host: str = "host-a") -> Path:
    """A host's /etc/meterd: tls/ with copies of its certificate, key and the CA."""
    tls = tmp_path / "etc" / "tls"
    tls.mkdir(parents=True)
    shutil.copy(pki_dir / "agents" / f"{host}.pem", tls / "agent.pem")
    shutil.copy(pki_dir / "agents" / f"{host}.key", tls / "agent.key")
    shutil.copy(pki_dir / "ca.pem", tls / "ca.pem")
    return tls.parent


def write_config(etc: Path, collector: str, extra: str = "") -> Path:
    path = etc / "agent.toml"
    path.write_text(
        f'collector = "{collector}"\nspool_path = "../var/agent/spool.db"\n{extra}\n'
    )
    return path


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def problems(findings: list[Finding]) -> dict[str, str]:
    return {f.check: f.message for f in findings if f.status == "problem"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def craft_agent_cert(
    pki_dir: Path, path: Path, *, not_before: datetime, not_after: datetime,
    host: str = "host-a",
) -> None:
    """An agent certificate with chosen validity, signed by the CA in ``pki_dir``,
    for the key already at ``path.with_suffix('.key')``."""
    ca_cert = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = serialization.load_pem_private_key(path.with_suffix(".key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(pki.HOST_URI_PREFIX + host)]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_all_checks_pass_against_a_running_collector(
    tmp_path: Path, pki_dir: Path, collector: CollectorProcess
) -> None:
    config = write_config(enrol(tmp_path, pki_dir), collector.target)
    result = meterd("agent", "check", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 9
    assert all(line.startswith("ok ") for line in lines), result.stdout
    assert "names host 'host-a'" in result.stdout
    assert "accepted this agent over TLSv1.3, verified as '127.0.0.1'" in result.stdout


def test_missing_configuration_is_the_only_problem_reported(tmp_path: Path) -> None:
    result = meterd("agent", "check", "--config", str(tmp_path / "agent.toml"))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"problem  configuration: {tmp_path / 'agent.toml'}: file not found "
        "(every key and its default: meterd agent config-help)",
        "skipped  other checks: they need a configuration that loads",
    ]


def test_key_open_to_others_says_how_to_fix_it(
    tmp_path: Path, pki_dir: Path, collector: CollectorProcess
) -> None:
    etc = enrol(tmp_path, pki_dir)
    (etc / "tls" / "agent.key").chmod(0o644)
    result = meterd("agent", "check", "--config", str(write_config(etc, collector.target)))
    assert result.returncode == 1
    assert (
        f"problem  private key: private key {etc / 'tls' / 'agent.key'} has mode 0644"
        in result.stdout
    )
    assert f"chmod 600 {etc / 'tls' / 'agent.key'}" in result.stdout
    assert "skipped  collector:" in result.stdout


def test_missing_key_skips_what_needs_it(tmp_path: Path, pki_dir: Path) -> None:
    etc = enrol(tmp_path, pki_dir)
    (etc / "tls" / "agent.key").unlink()
    found = by_check(run_checks(write_config(etc, f"127.0.0.1:{free_port()}")))
    assert found["private key"].status == "problem"
    assert "does not exist" in found["private key"].message
    assert "install -o meterd -g meterd -m 0600" in found["private key"].message
    assert found["key and certificate"].status == "skipped"
    assert found["collector"].status == "skipped"
    assert found["certificate"].ok


def test_key_of_another_host(tmp_path: Path, pki_dir: Path) -> None:
    etc = enrol(tmp_path, pki_dir)
    shutil.copy(pki_dir / "agents" / "host-b.key", etc / "tls" / "agent.key")
    found = problems(run_checks(write_config(etc, f"127.0.0.1:{free_port()}")))
    assert "does not belong to certificate" in found["key and certificate"]


def test_unreadable_certificate(tmp_path: Path, pki_dir: Path) -> None:
    etc = enrol(tmp_path, pki_dir)
    (etc / "tls" / "agent.pem").write_text("not a certificate\n")
    found = problems(run_checks(write_config(etc, f"127.0.0.1:{free_port()}")))
    assert "is not a PEM X.509 certificate" in found["certificate"]


def test_server_certificate_is_not_an_agent_certificate(tmp_path: Path, pki_dir: Path) -> None:
    etc = enrol(tmp_path, pki_dir)
    shutil.copy(pki_dir / "servers" / "localhost.pem", etc / "tls" / "agent.pem")
    shutil.copy(pki_dir / "servers" / "localhost.key", etc / "tls" / "agent.key")
    found = problems(run_checks(write_config(etc, f"127.0.0.1:{free_port()}")))
    assert "is not a client certificate" in found["certificate"]


def test_expired_certificate(
    tmp_path: Path, pki_dir: Path, collector: CollectorProcess
) -> None:
    etc = enrol(tmp_path, pki_dir)
    now = datetime.now(UTC)
    craft_agent_cert(pki_dir, etc / "tls" / "agent.pem",
                     not_before=now - timedelta(days=30), not_after=now - timedelta(days=1))
    found = problems(run_checks(write_config(etc, collector.target)))
    assert "expired on" in found["certificate validity"]
    assert "meterd pki issue-agent" in found["certificate validity"]
    assert "refused this agent's certificate" in found["collector"]


def test_certificate_not_valid_yet(tmp_path: Path, pki_dir: Path) -> None:
    etc = enrol(tmp_path, pki_dir)
    now = datetime.now(UTC)
    craft_agent_cert(pki_dir, etc / "tls" / "agent.pem",
                     not_before=now + timedelta(days=2), not_after=now + timedelta(days=30))
    found = problems(run_checks(write_config(etc, f"127.0.0.1:{free_port()}")))
    assert "is not valid before" in found["certificate validity"]
    assert "clock" in found["certificate validity"]


def test_certificate_from_another_ca(
    tmp_path: Path, pki_dir: Path, collector: CollectorProcess
) -> None:
    other = tmp_path / "other-pki"
    pki.init_ca(other, name="another CA")
    pki.issue_agent(other, "host-a")
    etc = enrol(tmp_path, pki_dir)
    shutil.copy(other / "agents" / "host-a.pem", etc / "tls" / "agent.pem")
    shutil.copy(other / "agents" / "host-a.key", etc / "tls" / "agent.key")
    found = problems(run_checks(write_config(etc, collector.target)))
    assert "was not signed by the CA in" in found["certificate issuer"]
    assert "CN=another CA" in found["certificate issuer"]
    assert "refused this agent's certificate" in found["collector"]
    assert set(found) == {"certificate issuer", "collector"}


def test_ca_that_did_not_sign_the_collector(
    tmp_path: Path, collector: CollectorProcess
) -> None:
    other = tmp_path / "other-pki"
    pki.init_ca(other, name="another CA")
    pki.issue_agent(other, "host-a")
    etc = enrol(tmp_path, other)
    found = problems(run_checks(write_config(etc, collector.target)))
    assert list(found) == ["collector"]
    assert "presented a certificate that the CA in" in found["collector"]


def test_collector_certificate_for_another_name(
    tmp_path: Path, pki_dir: Path, collector: CollectorProcess
) -> None:
    etc = enrol(tmp_path, pki_dir)
    config = write_config(etc, collector.target, 'server_name = "collector.example"')
    found = problems(run_checks(config))
    assert list(found) == ["collector"]
    assert "not valid for 'collector.example'" in found["collector"]
    assert "(it is valid for DNS localhost, IP 127.0.0.1)" in found["collector"]


def test_collector_not_running(tmp_path: Path, pki_dir: Path) -> None:
    etc = enrol(tmp_path, pki_dir)
    found = problems(run_checks(write_config(etc, f"127.0.0.1:{free_port()}")))
    assert list(found) == ["collector"]
    assert "refused the connection" in found["collector"]


def test_collector_that_never_answers(tmp_path: Path, pki_dir: Path) -> None:
    etc = enrol(tmp_path, pki_dir)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        found = problems(run_checks(write_config(etc, address), timeout=0.5))
    assert "did not answer within 0.5 s" in found["collector"]


def test_address_of_a_port_that_is_not_tls(
    tmp_path: Path, pki_dir: Path, collector: CollectorProcess
) -> None:
    etc = enrol(tmp_path, pki_dir)
    found = problems(run_checks(write_config(etc, f"127.0.0.1:{collector.api_port}")))
    assert "does not speak TLS" in found["collector"]


def test_spool_folder_that_is_a_file(tmp_path: Path, pki_dir: Path) -> None:
    etc = enrol(tmp_path, pki_dir)
    (tmp_path / "var").write_text("a file where the spool's folder should be")
    found = problems(run_checks(write_config(etc, f"127.0.0.1:{free_port()}")))
    assert "is not a folder" in found["spool"]


def test_spool_that_is_a_folder(tmp_path: Path, pki_dir: Path) -> None:
    etc = enrol(tmp_path, pki_dir)
    (tmp_path / "var" / "agent" / "spool.db").mkdir(parents=True)
    found = problems(run_checks(write_config(etc, f"127.0.0.1:{free_port()}")))
    assert "is not a regular file" in found["spool"]


def test_timeout_must_be_a_positive_number_of_seconds(tmp_path: Path) -> None:
    result = meterd("agent", "check", "--config", str(tmp_path / "a.toml"), "--timeout", "0")
    assert result.returncode == 2
    assert "--timeout: expected seconds between 0 and 3600, got '0'" in result.stderr
