"""The Debian package, built once per session with the documented command.

The build and its checks need Debian's tools. Outside CI a missing tool skips these
tests with the reason; under CI (``CI=true``) it fails them: ``.ci/run`` installs
the tools, so a missing one there is a broken pipeline, not a reason to skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import ROOT

IN_CI = os.environ.get("CI", "").lower() == "true"

DEBIAN_PYTHON = Path("/usr/bin/python3")
APT_HINT = (
    "apt-get install --no-install-recommends dpkg-dev binutils lintian systemd "
    "python3 python3-venv make"
)


def require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if "python3-venv" in tools:
        missing.remove("python3-venv")
        venv_ok = DEBIAN_PYTHON.exists() and subprocess.run(
            [str(DEBIAN_PYTHON), "-c", "import ensurepip, venv"], capture_output=True,
            check=False,
        ).returncode == 0
        if not venv_ok:
            missing.append("python3-venv (Debian's /usr/bin/python3 with venv)")
    if missing:
        message = f"missing Debian tools: {', '.join(missing)} ({APT_HINT})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@dataclass(frozen=True)
class Package:
    deb: Path
    tree: Path  # the package unpacked (dpkg -x): a throwaway root

    def field(self, name: str) -> str:
        return subprocess.run(
            ["dpkg-deb", "--field", str(self.deb), name],
            capture_output=True, text=True, check=True,
        ).stdout.strip()

    @property
    def python(self) -> Path:
        """The packaged environment's interpreter, inside the unpacked tree."""
        return next((self.tree / "opt/meterd/bin").glob("python3.*"))


@pytest.fixture(scope="session")
def package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    require_tools("make", "dpkg-deb", "dpkg-shlibdeps", "strip", "python3-venv")
    out = tmp_path_factory.mktemp("deb")
    build = subprocess.run(
        ["make", "--no-print-directory", "deb", f"DEB_OUT={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    debs = sorted(out.glob("meterd_*.deb"))
    assert len(debs) == 1, debs
    tree = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tree)], check=True)
    return Package(debs[0], tree)
