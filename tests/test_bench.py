"""`xfer bench --gpu-report`: the one call a lent GPU gets. Run here as a user would on a CPU (`--device cpu --quick`),
in a fresh process with its own Ray and MLflow server, so that a broken section is found before GPU time is spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xfer import bench, server

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_report_runs_every_section_on_a_cpu_and_prints_its_figures_as_json(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (server.TRACKING_URI_ENV, "RAY_ADDRESS")}
    env[server.RUNS_ENV] = str(tmp_path / "runs")
    done = subprocess.run([sys.executable, "-m", "xfer.bench", "--gpu-report", "--device", "cpu", "--quick", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)   # stdout is the JSON alone; the lines go to stderr
    assert report["device"] == "cpu" and report["install"]["cuda_available"] in (True, False)
    # The batched model against each cell alone: float32 on a CPU within one example of a window, and bf16 (the
    # arithmetic of GPU cells, run on the CPU here) within the tolerance it states.
    fp32, bf16 = report["correctness"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert fp32["ok"] and fp32["max_final_diff"] <= fp32["tolerance"] < 0.02
    assert bf16["ok"] and bf16["max_final_diff"] <= bf16["tolerance"]
    # The grid's real path three ways, for the quick report's one arch.
    [paths] = report["paths"]
    assert paths["arch"] == bench.GPU_REPORT_ARCHS[0] and paths["cells"] == 2
    assert set(paths["cells_per_hour"]) == {path for path, _ in bench.PACK_PATHS}
    assert all(rate > 0 for rate in paths["cells_per_hour"].values())
    [batched] = report["batched"]
    assert batched["arch"] == paths["arch"] and batched["vectorised_samples_per_s"] > 0 and batched["speedup"] > 0
    assert report["seed_grid_hours"] > 0
    # Scoring: one row per arch, a loop and a stacked rate (not an {"error": ...} section).
    [score] = report["score"]
    assert score["arch"] == paths["arch"] and score["loop_per_s"] > 0 and score["stacked_per_s"] > 0
    assert "FAILED" not in done.stderr and "gpu report took" in done.stderr
    assert server.read_server_file(tmp_path / "runs") is None, "no server left running in the user's runs folder"
