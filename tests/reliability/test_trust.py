"""Trust: what the collector's gRPC ingest listener accepts, scanned and attacked.

**Scan.** sslyze (with a valid agent certificate, since without one there is no
session to scan) probes SSL 2.0 to TLS 1.3 suite by suite, the elliptic-curve groups,
compression and Heartbleed: only TLS 1.3 suites are accepted, only strong groups
(X25519, X448, P-256, P-384, P-521), no compression.

What sslyze cannot tell on this listener, and how it is checked instead:

* *Client certificate required.* sslyze classifies the requirement from the
  handshake's failure; gRPC's TLS 1.3 server asks for a certificate
  (CertificateRequest), completes the handshake as TLS 1.3 lets it, and then closes
  the connection without an alert. sslyze only sees a connection it cannot use (its
  connectivity check fails without credentials and succeeds with them, which the
  test asserts). ``openssl s_client`` without a certificate shows the server's
  CertificateRequest ("Requested Signature Algorithms") and that no application
  data follows; a gRPC call without a certificate fails.
* *Finite-field groups.* sslyze probes elliptic-curve groups only; ``openssl
  s_client -tls1_3 -groups ffdhe2048`` (and 3072, 4096, 8192) must get no handshake.

**Refused certificates.** Against one running collector, each of these calls must fail
while the same call with a good certificate succeeds before and after: no client
certificate; a certificate from another CA; one that expired; one not valid yet
(both issued with ``meterd pki`` under libfaketime, two days off); the collector's
own server certificate (server authentication only); a certificate whose serial is
on the deny list (PERMISSION_DENIED, naming the serial). A valid certificate of
another host gets every record naming this host rejected with the reason, and an
agent refuses a collector whose certificate names another server. Nothing any of
them sent is in the ledger.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from sslyze.plugins.openssl_cipher_suites.implementation import CipherSuitesScanResult
from sslyze.plugins.scan_commands import ScanCommand
from sslyze.scanner.models import ServerScanRequest, ServerScanResult, ServerScanStatusEnum
from sslyze.scanner.scan_command_attempt import ScanCommandAttempt, ScanCommandAttemptStatusEnum
from sslyze.scanner.scanner import Scanner
from sslyze.server_setting import (
    ClientAuthenticationCredentials,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
)

from common import pki
from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from tests.harness import ROOT, CollectorProcess
from tests.reliability.faults import IN_CI, collector_config, faketime_env, free_port
from tests.reliability.reconcile import read_sqlite_ledger

T = TypeVar("T")
STRONG_GROUPS = {"X25519", "X448", "secp256r1", "secp384r1", "secp521r1"}


@dataclass
class Site:
    collector: CollectorProcess
    pki: Path
    ledger: Path


def issue_agent_at(pki_dir: Path, host: str, offset: str, days: int) -> None:
    """``meterd pki issue-agent`` run with the clock moved by ``offset``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **faketime_env(offset)}
    made = subprocess.run(
        [sys.executable, "-m", "common.cli", "pki", "issue-agent", "--days", str(days),
         str(pki_dir), host], env=env, capture_output=True, text=True, check=False, timeout=60)
    assert made.returncode == 0, made.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("trust")
    ours = root / "pki"
    pki.init_ca(ours)
    pki.issue_server(ours, "localhost", ip_addresses=["127.0.0.1"])
    for host in ("host-a", "host-b", "host-d"):
        pki.issue_agent(ours, host)
    denied = pki.certificate_serial((ours / "agents" / "host-d.pem").read_bytes())
    config = collector_config(root, ours, free_port(),
                              assignments={"host-a": "acme", "host-b": "globex"},
                              tls_extra=f'denied_serials = ["{denied:X}"]')
    collector = CollectorProcess(config).start()
    try:
        yield Site(collector, ours, root / "ledger.db")
    finally:
        collector.kill()


def now_us() -> int:
    return time.time_ns() // 1000


def push(site: Site, cert: Path | None, key: Path | None, host: str = "host-a",
         ca: Path | None = None, server_name: str = "") -> pb.PushResponse:
    """One record naming ``host``, sent with the given client certificate (or none)."""
    root = (ca or site.pki / "ca.pem").read_bytes()
    if cert is None or key is None:
        creds = grpc.ssl_channel_credentials(root_certificates=root)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=root,
                                             private_key=key.read_bytes(),
                                             certificate_chain=cert.read_bytes())
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    record = pb.UsageRecord(id=str(uuid.uuid4()), host_id=host, metric="cpu.seconds",
                            unit="seconds", quantity="1.25", start_us=now_us() - 2,
                            end_us=now_us() - 1)
    with grpc.secure_channel(site.collector.target, creds, options=options) as channel:
        stub = pb_grpc.IngestStub(channel)  # type: ignore[no-untyped-call]
        response: pb.PushResponse = stub.Push(pb.PushRequest(records=[record]), timeout=10)
        return response


def agent_files(pki_dir: Path, host: str) -> tuple[Path, Path]:
    return pki_dir / "agents" / f"{host}.pem", pki_dir / "agents" / f"{host}.key"


def refused(site: Site, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        push(site, *args, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_bad_certificates_are_refused_and_write_nothing(site: Site, tmp_path: Path) -> None:
    good = agent_files(site.pki, "host-a")
    before = push(site, *good)
    assert [a.outcome for a in before.acks] == [pb.ACCEPTED]
    posted = {a.id for a in before.acks}

    # Certificates issued on a clock moved back three days (valid one day: expired
    # two days ago) and forward two days (valid from then).
    dated = tmp_path / "dated"
    shutil.copytree(site.pki, dated)
    issue_agent_at(dated, "host-a", "-3d", 1)
    expired = agent_files(dated, "host-a")
    issue_agent_at(dated, "host-b", "+2d", 30)
    not_yet_valid = agent_files(dated, "host-b")
    other_ca = tmp_path / "other-ca"
    pki.init_ca(other_ca)
    pki.issue_agent(other_ca, "host-a")

    cases = {
        "no certificate": ((None, None), {}),
        "another CA": (agent_files(other_ca, "host-a"), {}),
        "expired": (expired, {}),
        "not yet valid": (not_yet_valid, {"host": "host-b"}),
        "server certificate": ((site.pki / "servers" / "localhost.pem",
                                site.pki / "servers" / "localhost.key"), {"host": "localhost"}),
    }
    for name, (files, kwargs) in cases.items():
        error = refused(site, *files, **kwargs)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (name, error)
        print(f"{name}: {error.code()}: {error.details()}")

    denied = refused(site, *agent_files(site.pki, "host-d"), host="host-d")
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    serial = pki.certificate_serial(agent_files(site.pki, "host-d")[0].read_bytes())
    assert f"{serial:x}" in (denied.details() or "").lower()

    # A valid certificate of another host: heard, and every record naming host-a refused.
    spoofed = push(site, *agent_files(site.pki, "host-b"), host="host-a")
    assert [a.outcome for a in spoofed.acks] == [pb.REJECTED]
    assert "certificate is for 'host-b'" in spoofed.acks[0].reason

    # An agent refuses a collector whose certificate names another server.
    impostor = refused(site, *good, server_name="collector.example.net")
    assert impostor.code() == grpc.StatusCode.UNAVAILABLE

    after = push(site, *good)
    assert [a.outcome for a in after.acks] == [pb.ACCEPTED]
    posted |= {a.id for a in after.acks}
    assert set(read_sqlite_ledger(site.ledger).records) == posted


def scan(site: Site, credentials: ClientAuthenticationCredentials | None,
         commands: set[ScanCommand], port: int | None = None) -> ServerScanResult:
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(
            "localhost", site.collector.grpc_port if port is None else port, "127.0.0.1"),
        network_configuration=ServerNetworkConfiguration(
            "localhost", tls_client_auth_credentials=credentials, network_max_retries=1),
        scan_commands=commands,
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    return result


def completed(what: str, attempt: ScanCommandAttempt[T]) -> T:
    assert attempt.status == ScanCommandAttemptStatusEnum.COMPLETED, (
        what, attempt.error_reason, attempt.error_trace)
    assert attempt.result is not None
    return attempt.result


TLS_SCAN = {
    ScanCommand.SSL_2_0_CIPHER_SUITES, ScanCommand.SSL_3_0_CIPHER_SUITES,
    ScanCommand.TLS_1_0_CIPHER_SUITES, ScanCommand.TLS_1_1_CIPHER_SUITES,
    ScanCommand.TLS_1_2_CIPHER_SUITES, ScanCommand.TLS_1_3_CIPHER_SUITES,
    ScanCommand.ELLIPTIC_CURVES, ScanCommand.TLS_COMPRESSION, ScanCommand.HEARTBLEED,
}


def assert_tls13_only_with_strong_groups(result: ServerScanResult) -> None:
    """No suite of SSL 2.0 to TLS 1.2, some TLS 1.3 suite, only strong elliptic-curve
    groups, no compression, no Heartbleed."""
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    assert result.scan_result is not None
    found = result.scan_result
    old: dict[str, ScanCommandAttempt[CipherSuitesScanResult]] = {
        "SSL 2.0": found.ssl_2_0_cipher_suites, "SSL 3.0": found.ssl_3_0_cipher_suites,
        "TLS 1.0": found.tls_1_0_cipher_suites, "TLS 1.1": found.tls_1_1_cipher_suites,
        "TLS 1.2": found.tls_1_2_cipher_suites,
    }
    for version, attempt in old.items():
        accepted = completed(version, attempt).accepted_cipher_suites
        assert not accepted, (version, [s.cipher_suite.name for s in accepted])
    tls13 = completed("TLS 1.3", found.tls_1_3_cipher_suites).accepted_cipher_suites
    assert tls13, "no TLS 1.3 suite accepted"
    curves = completed("groups", found.elliptic_curves)
    supported = {c.name for c in curves.supported_curves or []}
    assert supported, "no group at all"
    assert supported <= STRONG_GROUPS, supported
    assert not completed("compression", found.tls_compression).supports_compression
    assert not completed("heartbleed", found.heartbleed).is_vulnerable_to_heartbleed
    print("TLS 1.3 suites:", sorted(s.cipher_suite.name for s in tls13), "groups:",
          sorted(supported))


# sslyze loads its bundled trust stores, one of which holds a certificate with a
# non-positive serial: cryptography warns about it, in sslyze's own code.
@pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")
def test_sslyze_finds_tls13_only_and_strong_groups(site: Site) -> None:
    cert, key = agent_files(site.pki, "host-a")
    result = scan(site, ClientAuthenticationCredentials(certificate_chain_path=cert,
                                                         key_path=key), TLS_SCAN)
    assert_tls13_only_with_strong_groups(result)

    # Without a client certificate sslyze gets no usable connection (see the module
    # docstring for why it cannot name the requirement itself).
    bare = scan(site, None, {ScanCommand.TLS_1_3_CIPHER_SUITES})
    assert bare.scan_status == ServerScanStatusEnum.ERROR_NO_CONNECTIVITY, bare.scan_status


@pytest.fixture(scope="module")
def rest_tls_port(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The REST API of a second collector on the same PKI, with ``[api] tls = true``."""
    root = tmp_path_factory.mktemp("trust-rest")
    config = collector_config(root, site.pki, free_port(), assignments={"host-a": "acme"})
    listen = '[api]\nlisten = "127.0.0.1:0"\n'
    text = config.read_text()
    assert listen in text
    config.write_text(text.replace(listen, listen + "tls = true\n"))
    collector = CollectorProcess(config).start()
    try:
        yield collector.api_port
    finally:
        collector.kill()


@pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")
def test_sslyze_finds_the_rest_api_tls13_only_with_strong_groups(
    site: Site, rest_tls_port: int
) -> None:
    assert_tls13_only_with_strong_groups(scan(site, None, TLS_SCAN, port=rest_tls_port))


def openssl_s_client(site: Site, *args: str) -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        if IN_CI:
            pytest.fail("the openssl command is required under CI")
        pytest.skip("no openssl command")
    result = subprocess.run(
        [openssl, "s_client", "-connect", site.collector.target, "-servername", "localhost",
         "-CAfile", str(site.pki / "ca.pem"), "-tls1_3", *args],
        input="", capture_output=True, text=True, check=False, timeout=30)
    return result.stdout + result.stderr


def test_client_certificate_required_and_no_finite_field_groups(site: Site) -> None:
    without = openssl_s_client(site)
    assert "Requested Signature Algorithms" in without, without  # a CertificateRequest came
    assert "New, TLSv1.3" in without, without
    with pytest.raises(grpc.RpcError):
        push(site, None, None)
    cert, key = agent_files(site.pki, "host-a")
    for group in ("ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe8192"):
        out = openssl_s_client(site, "-groups", group, "-cert", str(cert), "-key", str(key))
        assert "Cipher is (NONE)" in out, (group, out)
    strong = openssl_s_client(site, "-groups", "X25519", "-cert", str(cert), "-key", str(key))
    assert "New, TLSv1.3" in strong, strong  # the same command does connect with a strong group
