"""Installing: pip is stopped within seconds with the uv command that works; uv and other frontends build as usual."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_SYSTEM = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]


def call_hook(hook: str, **env: str) -> subprocess.CompletedProcess:
    """Call a build hook as a frontend does: a fresh interpreter in the project's folder, backend-path first on sys.path."""
    code = (f"import importlib, sys; sys.path[:0] = {BUILD_SYSTEM['backend-path']!r}; "
            f"backend = importlib.import_module({BUILD_SYSTEM['build-backend']!r}); print(backend.{hook}())")
    clean = {k: v for k, v in os.environ.items() if k not in ("PIP_BUILD_TRACKER", "XFER_ALLOW_PIP")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("hook, install", [
    ("get_requires_for_build_editable", "-m uv pip install -p {python} -e .\n"),
    ("get_requires_for_build_wheel", "-m uv pip install -p {python} .\n"),
])
def test_under_pip_the_first_hook_prints_the_uv_command_and_stops(hook: str, install: str, tmp_path: Path) -> None:
    refused = call_hook(hook, PIP_BUILD_TRACKER=str(tmp_path))  # what pip sets for every build subprocess
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("xfer: pip cannot install xfer. torchattacks 3.5.1 pins requests~=2.25.1")
    assert f"cd {ROOT} && {sys.executable} -m pip install uv && {sys.executable} " in refused.stderr
    assert install.format(python=sys.executable) in refused.stderr and "Traceback" not in refused.stderr


def test_other_frontends_and_an_explicit_allowance_are_not_stopped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(ROOT / BUILD_SYSTEM["backend-path"][0]))
    backend = importlib.import_module(BUILD_SYSTEM["build-backend"])
    monkeypatch.delenv("PIP_BUILD_TRACKER", raising=False)
    monkeypatch.delenv("XFER_ALLOW_PIP", raising=False)
    assert backend.refusal(editable=True) is None  # uv, `python -m build`: no PIP_BUILD_TRACKER
    monkeypatch.setenv("PIP_BUILD_TRACKER", str(tmp_path))
    assert backend.refusal(editable=False) is not None
    monkeypatch.setenv("XFER_ALLOW_PIP", "1")
    assert backend.refusal(editable=False) is None
    # Every PEP 517 / 660 hook is there, and the get_requires hooks ask for setuptools (build-system requires nothing).
    assert BUILD_SYSTEM["requires"] == []
    for hook in ("build_wheel", "build_editable", "build_sdist", "prepare_metadata_for_build_wheel",
                 "prepare_metadata_for_build_editable"):
        assert callable(getattr(backend, hook))
    for hook in ("get_requires_for_build_wheel", "get_requires_for_build_editable", "get_requires_for_build_sdist"):
        assert getattr(backend, hook)() == [backend.SETUPTOOLS]


def test_pip_install_stops_within_seconds_offline(tmp_path: Path) -> None:
    """The real pip, as a user runs it (less the network: no index, no build isolation, a dry run)."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("this environment has no pip")
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("XFER_ALLOW_PIP", None)
    start = time.monotonic()
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                          "--no-deps", "-e", str(ROOT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    seconds = time.monotonic() - start
    output = pip.stdout + pip.stderr
    assert pip.returncode != 0 and "xfer: pip cannot install xfer." in output and "-m uv pip install" in output
    assert seconds < 60, f"pip took {seconds:.0f} s to refuse"  # its resolver, unstopped, runs for minutes
