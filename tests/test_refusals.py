"""Bad input at the command line: refused in seconds, one paragraph, no traceback, nothing started, MLflow unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tracking_fixtures import Server
from xfer import server, tracking

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "sweeps" / "full_grid.py"


def refuse(args: list[str], runs: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=180,
                          env={**env, "PYTHONPATH": str(REPO), server.RUNS_ENV: str(runs)})


CASES = {
    "typo in a grid file": (["--grid", "{grid}"], "unknown grid settings sizez"),
    "negative size": (["--preset", "smoke", "--sizes", "-5"], "--sizes / sizes: -5 must be at least 0"),
    "unknown source": (["--preset", "smoke", "--sources", "kmnistt"], "unknown dataset 'kmnistt'"),
    "eps beyond the pixel range": (["--preset", "smoke", "--eps", "2.0"], "--eps / eps: 2.0 must lie in [0, 1]"),
    "empty image folder": (["--preset", "smoke", "--target", "imagefolder:{empty}"], "has no usable class subfolders"),
    "missing torchvision files": (["--sources", "kmnist", "--archs", "resnet_mini", "--data-root", "{empty}"],
                                  "t10k-images-idx3-ubyte"),
    "a rehearsal of a missing image folder": (["--preset", "smoke", "--target", "imagefolder:{empty}/nothing",
                                               "--fast-dev-run"], "stands in for absent torchvision sets only"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_anything_starts(case: str, tmp_path: Path, mlflow_server: Server) -> None:
    args, expected = CASES[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "grid.yaml").write_text("sizez: [500]\n")
    args = [a.format(grid=tmp_path / "grid.yaml", empty=tmp_path / "empty") for a in args]
    runs = tmp_path / "runs"
    # Once against a runs folder of its own (no MLflow configured): nothing may start there.
    clean = {k: v for k, v in os.environ.items() if k != server.TRACKING_URI_ENV}
    done = refuse(args, runs, clean)
    assert done.returncode == 2, done.stderr
    assert expected in " ".join(done.stderr.split()) and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("xfer: ") and "\n\n" not in done.stderr.strip()   # one paragraph
    assert not (runs / "mlflow.db").exists() and not (runs / server.SERVER_FILE).exists()
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(runs) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, "a refused command left a process behind"
    # And against the session's MLflow server: its runs are exactly what they were.
    experiments = tracking._client().search_experiments()
    runs_before = tracking._client().search_runs([e.experiment_id for e in experiments], max_results=50000)
    again = refuse(args, runs, dict(os.environ))
    assert again.returncode == 2 and expected in " ".join(again.stderr.split())
    runs_after = tracking._client().search_runs([e.experiment_id for e in experiments], max_results=50000)
    assert [(r.info.run_id, r.info.status) for r in runs_after] == [(r.info.run_id, r.info.status) for r in runs_before]


def test_a_refusal_paragraph_never_splits_a_hyphenated_name_or_flag(capsys: pytest.CaptureFixture) -> None:
    """textwrap's default breaks after hyphens: '--data-root' or 'study-cba03721' split over two lines cannot be
    copied or searched for. Every position of the name relative to the 100-column wrap is tried."""
    from xfer.cli import run_main
    from xfer.errors import XferError

    for pad in range(60, 110):
        def refuse() -> None:
            raise XferError("x" * pad + " pass --data-root or the experiment study-cba03721-long-name instead.")

        with pytest.raises(SystemExit):
            run_main(refuse)
        err = capsys.readouterr().err
        assert "--data-root" in err and "study-cba03721-long-name" in err, pad
