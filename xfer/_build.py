"""xfer's build backend: setuptools, except that pip is stopped at once with the uv command that works.

pip cannot install xfer: torchattacks pins requests~=2.25.1 (every release since 3.4.0, the first with the
API xfer uses; it never imports requests), MLflow needs requests>=2.28, and pip cannot override a
dependency's pin: left alone its resolver backtracks for more than ten minutes, and with requests>=2.28
declared it still ends, after 14-40 s, in ResolutionImpossible with no remedy. uv honours [tool.uv]
override-dependencies in pyproject.toml. pip runs every build hook with PIP_BUILD_TRACKER in the environment
(uv, `python -m build` and other frontends do not), so the first hook pip calls, before it has installed or
resolved anything, prints the uv command for this same interpreter and stops.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

PIP_ENV = "PIP_BUILD_TRACKER"  # set by pip for its build subprocesses (pip/_internal/operations/build/build_tracker.py)
ALLOW_ENV = "XFER_ALLOW_PIP"   # "1": let pip build anyway, e.g. `pip install --no-deps` into an environment set up by hand
# The builder underneath. pyproject.toml's build-system requires nothing and the get_requires hooks ask for it,
# so pip is refused before it has installed anything (seconds sooner); 70.1 is the first that needs no `wheel`.
SETUPTOOLS = "setuptools>=70.1"


def refusal(editable: bool) -> str | None:
    """What to tell a pip user instead of building, or None when the frontend is not pip (or pip is allowed)."""
    if PIP_ENV not in os.environ or os.environ.get(ALLOW_ENV) == "1":
        return None
    python = shlex.quote(sys.executable)  # pip runs build hooks with the interpreter it installs into
    project = shlex.quote(str(Path.cwd()))  # ... in the project's folder, where uv finds [tool.uv]
    return (
        "xfer: pip cannot install xfer. torchattacks 3.5.1 pins requests~=2.25.1 (it never imports requests) while "
        "MLflow needs requests>=2.28, and pip cannot override a dependency's pin. uv can: it honours the override "
        "in pyproject.toml, which it reads from the folder it runs in. Into this same environment, run:\n\n"
        f"    cd {project} && {python} -m pip install uv && {python} -m uv pip install -p {python} "
        f"{'-e ' if editable else ''}.\n\n"
        "(\".[dev]\" in place of the last . adds the test tools, as README's quick start does). To build with pip "
        f"anyway, e.g. for `pip install --no-deps` into an environment you set up yourself, set {ALLOW_ENV}=1."
    )


def _stop_pip(editable: bool) -> None:
    message = refusal(editable)
    if message:
        sys.exit(message)  # exit status 1 with the message alone: pip shows it as the hook's output, no traceback


def _setuptools() -> ModuleType:
    from setuptools import build_meta  # installed by the frontend after get_requires_for_build_* asked for it

    return build_meta


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    _stop_pip(editable=True)
    return [SETUPTOOLS]


def prepare_metadata_for_build_editable(metadata_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    _stop_pip(editable=True)
    return _setuptools().prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_editable(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                   metadata_directory: str | None = None) -> str:
    _stop_pip(editable=True)
    return _setuptools().build_editable(wheel_directory, config_settings, metadata_directory)


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    _stop_pip(editable=False)
    return [SETUPTOOLS]


def prepare_metadata_for_build_wheel(metadata_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    _stop_pip(editable=False)
    return _setuptools().prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def build_wheel(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    _stop_pip(editable=False)
    return _setuptools().build_wheel(wheel_directory, config_settings, metadata_directory)


def get_requires_for_build_sdist(config_settings: dict[str, Any] | None = None) -> list[str]:
    return [SETUPTOOLS]  # an sdist installs nothing: pip is not stopped here


def build_sdist(sdist_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    return _setuptools().build_sdist(sdist_directory, config_settings)
