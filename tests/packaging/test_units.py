"""The systemd units: verify clean, exposure 2.0 or lower, and still able to do the job."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import ROOT
from tests.packaging.conftest import Package, require_tools

UNITS = ["meterd-agent.service", "meterd-collector.service"]
MAX_EXPOSURE = 2.0


def unit(name: str) -> dict[str, list[str]]:
    """The unit file's [Service] settings, every value of a repeated key kept."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in (ROOT / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.fixture(scope="module")
def systemd_root(package: Package, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unpacked package plus what systemd-analyze resolves in a real root: the
    host's unit files (targets the units order against) and /bin/kill."""
    require_tools("systemd-analyze")
    root = tmp_path_factory.mktemp("systemd-root")
    shutil.copytree(package.tree, root, symlinks=True, dirs_exist_ok=True)
    units = root / "lib/systemd/system"
    for host_units in (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system")):
        if host_units.is_dir():
            for path in host_units.iterdir():
                if not (units / path.name).exists() and not path.is_dir():
                    shutil.copy2(path, units / path.name, follow_symlinks=False)
    (root / "bin").mkdir(exist_ok=True)
    kill = shutil.which("kill", path="/bin:/usr/bin")
    assert kill is not None
    shutil.copy2(kill, root / "bin/kill")
    return root


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_is_clean(systemd_root: Path, name: str) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={systemd_root}", "--man=no",
         str(systemd_root / "lib/systemd/system" / name)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def exposure(name: str) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager",
         str(ROOT / "systemd" / name)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    found = re.search(rf"Overall exposure level for {re.escape(name)}: (\d+\.\d+)",
                      result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


@pytest.mark.parametrize("name", UNITS)
def test_security_exposure_is_at_most_two(name: str) -> None:
    require_tools("systemd-analyze")
    assert exposure(name) <= MAX_EXPOSURE


@pytest.mark.parametrize("name", UNITS)
def test_units_are_notify_services_that_reload_and_restart(name: str) -> None:
    s = unit(name)
    assert s["Type"] == ["notify"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"]
    assert s["User"] == ["meterd"]
    assert s["StateDirectory"] == ["meterd"]
    assert s["ProtectSystem"] == ["strict"]
    assert s["ReadWritePaths"] == ["/var/lib/meterd"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["SystemCallFilter"][0] == "@system-service"
    config = "agent" if "agent" in name else "collector"
    assert s["ExecStart"] == [f"/usr/bin/meterd {config} run --config /etc/meterd/{config}.toml"]


def test_agent_unit_still_sees_what_it_meters() -> None:
    s = unit("meterd-agent.service")
    # /proc/stat, /proc/meminfo, /proc/net/dev are not per-process files.
    assert "ProcSubset" not in s
    # Host network counters are those of the host's network namespace.
    assert s.get("PrivateNetwork", ["no"]) == ["no"]
    # The collector is reached over IP.
    assert {"AF_INET", "AF_INET6"} <= set(" ".join(s["RestrictAddressFamilies"]).split())
    # /sys and cgroups stay readable: these options make them read-only, not hidden.
    assert "InaccessiblePaths" not in s
    assert all("/sys" not in v and "/proc" not in v for v in s.get("TemporaryFileSystem", []))
