"""Installing: plain pip works (`pip install -e .`, `pip install .`), as uv and other frontends do.

Until torchattacks 3.3.0, every torchattacks release xfer could use pinned requests~=2.25.1 against MLflow's
requests>=2.28, which pip cannot resolve; these tests would fail on that environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("this environment has no pip")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_installed_environment_has_no_conflicting_requirement() -> None:
    """pip's own verdict on what the quick start installed: every installed distribution's requirements are met
    (torchattacks 3.4-3.5.1 would be reported here: 'has requirement requests~=2.25.1')."""
    checked = _pip("check", cwd=ROOT)
    assert checked.returncode == 0 and "No broken requirements found" in checked.stdout, checked.stdout + checked.stderr


def test_the_build_is_plain_setuptools_and_pip_builds_xfer(tmp_path: Path) -> None:
    """No build backend of xfer's own, no resolver override a frontend must honour: pip builds the wheel that
    `pip install .` installs (its build dependencies from the build environment already here)."""
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
    assert "override-dependencies" not in PYPROJECT.get("tool", {}).get("uv", {})
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path), str(ROOT), cwd=tmp_path)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    [wheel] = tmp_path.glob("xfer-*.whl")
    requires = subprocess.run([sys.executable, "-c", "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); "
                               "print(z.read(next(n for n in z.namelist() if n.endswith('METADATA'))).decode())",
                               str(wheel)], capture_output=True, text=True, check=True).stdout
    assert "Requires-Dist: torchattacks==3.3.0" in requires and "Requires-Dist: requests" not in requires
