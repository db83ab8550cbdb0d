"""The .deb: its metadata, its contents, lintian, and meterd run from the unpacked tree."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from agent.config import AgentConfig
from collector.config import CollectorConfig, LedgerConfig
from common import config
from tests.harness import ROOT
from tests.packaging.conftest import DEBIAN_PYTHON, Package, require_tools

CONFFILES = ["/etc/meterd/agent.toml", "/etc/meterd/collector.toml"]


def debian_python_version() -> str:
    return subprocess.run(
        [str(DEBIAN_PYTHON), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()


def packaged_meterd(
    package: Package, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``meterd`` from the unpacked package: its environment's Python runs its script.

    The environment finds its ``pyvenv.cfg`` beside the interpreter it is started
    as, so this runs the packaged code and dependencies, not the checkout's.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run(
        [str(package.python), str(package.tree / "opt/meterd/bin/meterd"), *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=cwd, env=env,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- metadata and contents ----------------------------------------------------------


def test_control_fields(package: Package) -> None:
    pyver = debian_python_version()
    assert package.field("Package") == "meterd"
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert package.field("Architecture") == arch
    assert re.fullmatch(r"\d+\.\d+\.\d+.*-\d+", package.field("Version"))
    depends = [d.strip() for d in package.field("Depends").split(",")]
    assert f"python{pyver}" in depends
    assert "adduser" in depends
    assert any(d.startswith("libc6 (>= ") for d in depends), depends  # from dpkg-shlibdeps
    assert package.deb.name == f"meterd_{package.field('Version')}_{arch}.deb"


def test_conffiles_and_maintainer_scripts(package: Package) -> None:
    control = subprocess.run(
        ["dpkg-deb", "--ctrl-tarfile", str(package.deb)], capture_output=True, check=True
    ).stdout
    listing = subprocess.run(["tar", "-tvf", "-"], input=control, capture_output=True,
                             check=True).stdout.decode()
    for script in ("postinst", "prerm", "postrm"):
        assert re.search(rf"^-rwxr-xr-x root/root .* \./{script}$", listing, re.M), listing
    conffiles = subprocess.run(
        ["dpkg-deb", "--info", str(package.deb), "conffiles"], capture_output=True, text=True,
        check=True,
    ).stdout.split()
    assert conffiles == CONFFILES
    for script in ("postinst", "prerm", "postrm"):
        path = ROOT / "packaging/debian" / script
        assert subprocess.run(["sh", "-n", str(path)], check=False).returncode == 0


def test_layout(package: Package) -> None:
    tree = package.tree
    pyver = debian_python_version()
    assert os.readlink(tree / "usr/bin/meterd") == "/opt/meterd/bin/meterd"
    first = (tree / "opt/meterd/bin/meterd").read_text().splitlines()[0]
    assert first == f"#!/opt/meterd/bin/python{pyver}"
    interpreter = os.readlink(tree / f"opt/meterd/bin/python{pyver}")
    assert interpreter == f"/usr/bin/python{pyver}"
    # The interpreter belongs to a Debian package: the one the package depends on.
    owner = subprocess.run(["dpkg", "-S", interpreter], capture_output=True, text=True,
                           check=True).stdout
    assert owner.startswith(f"python{pyver}")
    cfg = (tree / "opt/meterd/pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in cfg
    assert "command" not in cfg
    assert not (tree / "opt/meterd/bin/pip").exists()
    assert not (tree / "var").exists(), "state directories are made by the postinst"
    assert (tree / "lib/systemd/system/meterd-agent.service").read_bytes() == (
        ROOT / "systemd/meterd-agent.service"
    ).read_bytes()
    assert (tree / "lib/systemd/system/meterd-collector.service").read_bytes() == (
        ROOT / "systemd/meterd-collector.service"
    ).read_bytes()
    for doc in ("copyright", "changelog.Debian.gz", "README.md"):
        assert (tree / "usr/share/doc/meterd" / doc).is_file()
    assert (tree / "usr/share/man/man1/meterd.1.gz").is_file()
    leftovers = [p for p in tree.rglob("*") if p.name == "__pycache__" or p.suffix == ".pyc"]
    assert leftovers == []


def test_dashboard_assets_are_packaged(package: Package) -> None:
    site = next((package.tree / "opt/meterd/lib").glob("python3.*/site-packages"))
    shipped = {p.name for p in (site / "collector/api/ui").iterdir() if p.is_file()}
    source = {p.name for p in (ROOT / "collector/api/ui").iterdir()
              if p.suffix in {".html", ".js", ".css", ".py"}}
    assert source <= shipped, sorted(source - shipped)


def test_copyright_names_every_bundled_distribution(package: Package) -> None:
    text = (package.tree / "usr/share/doc/meterd/copyright").read_text()
    site = next((package.tree / "opt/meterd/lib").glob("python3.*/site-packages"))
    bundled = {p.name.split("-")[0] for p in site.glob("*.dist-info")} - {"meterd"}
    assert bundled
    for name in bundled:
        assert f"/{name}-" in text or f"/{name}/" in text, name
    assert "License: unknown" not in text


# --- lintian ------------------------------------------------------------------------


def test_lintian_reports_no_errors_or_warnings(package: Package) -> None:
    require_tools("lintian")
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", "--pedantic", str(package.deb)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert tags == []
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_lintian_override_says_why(package: Package) -> None:
    lines = (package.tree / "usr/share/lintian/overrides/meterd").read_text().splitlines()
    explained = False
    for line in lines:
        if line.startswith("#"):
            explained = True
        elif not line.strip():
            explained = False
        else:
            assert explained, f"override without a reason: {line}"


# --- configuration files ------------------------------------------------------------


def uncommented(text: str) -> str:
    """Every commented default turned into a setting (example tables stay comments)."""
    return re.sub(r"^#(?=[a-z_]+ = )", "", text, flags=re.M)


def test_agent_conffile_is_the_code_defaults(package: Package) -> None:
    text = (package.tree / "etc/meterd/agent.toml").read_text()
    assert config.loads(AgentConfig, text) == AgentConfig()
    assert config.loads(AgentConfig, uncommented(text)) == AgentConfig()
    for key, _, help_text in config.describe(AgentConfig):
        name = key.rpartition(".")[2]
        assert re.search(rf"^# {re.escape(help_text)}\n#{name} = ", text, re.M), key


def test_collector_conffile_is_the_code_defaults_but_keeps_the_ledger_in_var(
    package: Package,
) -> None:
    text = (package.tree / "etc/meterd/collector.toml").read_text()
    expected = CollectorConfig(
        ledger=LedgerConfig(sqlite_path=Path("/var/lib/meterd/collector/ledger.db"))
    )
    assert config.loads(CollectorConfig, text) == expected
    assert config.loads(CollectorConfig, uncommented(text)) == expected
    for f in fields(CollectorConfig):
        assert re.search(rf"^#?\[*{f.name}\b|^#?{f.name} = ", text, re.M), f.name
    for key, _, help_text in config.describe(CollectorConfig):
        assert help_text in text, key


# --- meterd from the package --------------------------------------------------------


def test_packaged_meterd_version(package: Package) -> None:
    result = packaged_meterd(package, "--version")
    assert result.returncode == 0, result.stderr
    upstream = package.field("Version").rsplit("-", 1)[0]
    assert result.stdout.strip() == f"meterd {upstream}"


def test_packaged_meterd_runs_its_own_code(package: Package) -> None:
    result = packaged_meterd(package, "agent", "config-help")
    assert result.returncode == 0, result.stderr
    probe = subprocess.run(
        [str(package.python), "-I", "-c",
         "import agent, common, grpc; print(agent.__file__, common.__file__, grpc.__file__)"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout.split()
    assert len(probe) == 3
    assert all(path.startswith(str(package.tree / "opt/meterd/lib/")) for path in probe), probe


def test_packaged_agent_check_on_a_host_not_enrolled_yet(package: Package) -> None:
    result = packaged_meterd(
        package, "agent", "check", "--config", str(package.tree / "etc/meterd/agent.toml")
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = {line.split(":", 1)[0]: line for line in result.stdout.splitlines()}
    tls = package.tree / "etc/meterd/tls"
    assert lines["ok       configuration"]
    assert f"private key {tls / 'agent.key'} does not exist" in lines["problem  private key"]
    assert f"certificate {tls / 'agent.pem'} does not exist" in lines["problem  certificate"]
    assert f"CA certificate {tls / 'ca.pem'} does not exist" in lines["problem  CA certificate"]
    assert "skipped  collector" in lines


def test_packaged_agent_check_with_certificates_but_no_collector(
    package: Package, pki_dir: Path, tmp_path: Path
) -> None:
    etc = tmp_path / "etc/meterd"
    (etc / "tls").mkdir(parents=True, mode=0o700)
    shutil.copy(pki_dir / "agents/host-a.pem", etc / "tls/agent.pem")
    shutil.copy(pki_dir / "agents/host-a.key", etc / "tls/agent.key")
    shutil.copy(pki_dir / "ca.pem", etc / "tls/ca.pem")
    packaged = (package.tree / "etc/meterd/agent.toml").read_text()
    port = free_port()
    (etc / "agent.toml").write_text(
        packaged.replace('#collector = "127.0.0.1:7443"', f'collector = "127.0.0.1:{port}"')
        .replace("#spool_path = ", f'spool_path = "{tmp_path}/spool/spool.db"\n#')
    )
    result = packaged_meterd(package, "agent", "check", "--config", str(etc / "agent.toml"))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines if not line.startswith("ok ")] == [
        "problem  collector"
    ], result.stdout
    assert f"collector 127.0.0.1:{port} refused the connection" in lines[-1]
    assert "names host 'host-a'" in result.stdout


def test_packaged_meterd_through_its_absolute_paths(package: Package) -> None:
    """/usr/bin/meterd -> /opt/meterd/bin/meterd -> #!/opt/meterd/bin/python3.X, with
    the unpacked /opt mounted over the host's in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "true"],
                           capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode().strip()}")
    script = (
        f'mount --bind "{package.tree}/opt" /opt && '
        f'exec "{package.tree}/usr/bin/meterd" --version'
    )
    result = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"meterd {package.field('Version').rsplit('-', 1)[0]}"
