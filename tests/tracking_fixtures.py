"""MLflow fixtures: a real `mlflow server` on 127.0.0.1 over SQLite, in a temporary runs folder.

conftest.py provides them to every test module. Do not import them into a test module as well: a fixture
imported into a module is a second definition, so a session-scoped one would start a second server there.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xfer import server


@dataclass(frozen=True)
class Server:
    url: str
    root: Path   # the runs folder: mlflow.db, artifacts/, server.json, mlflow-server.log


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the session; $MLFLOW_TRACKING_URI and $XFER_RUNS point at it while tests run."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as env:
        env.delenv(server.TRACKING_URI_ENV, raising=False)
        env.setenv(server.RUNS_ENV, str(root))
        url = server.ensure_server(root)  # also sets MLFLOW_TRACKING_URI, undone when the context ends
        try:
            yield Server(url, root)
        finally:
            server.stop_server(root)


@pytest.fixture
def experiment(mlflow_server: Server, request: pytest.FixtureRequest) -> str:
    """A fresh experiment name on the session's server, so tests never see each other's runs."""
    return f"{request.node.name}-{uuid.uuid4().hex[:8]}"
