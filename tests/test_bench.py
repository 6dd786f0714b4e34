"""`xfer bench --gpu-report`: the one call a lent GPU gets. Run here as a user would on a CPU (`--device cpu --quick`),
in a fresh process, so that a broken section is found before GPU time is spent."""

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
def test_gpu_report_streams_every_sections_figures_as_json_lines_on_a_cpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (server.TRACKING_URI_ENV, "RAY_ADDRESS")}
    env[server.RUNS_ENV] = str(tmp_path / "runs")
    done = subprocess.run([sys.executable, "-m", "xfer.bench", "--gpu-report", "--device", "cpu", "--quick", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]   # stdout is JSON Lines alone; people's lines on stderr
    assert [line["section"] for line in lines] == [*bench.DEFAULT_SECTIONS, "report"]   # GPU-bound first, no paths
    sections = {line.pop("section"): line for line in lines}
    report = sections.pop("report")
    assert report["sections"] == sections and report["device"] == "cpu"   # the last line is every line before it
    assert report["failed"] == [] and report["skipped"] == []
    assert not [name for name, payload in sections.items() if "error" in payload]
    arch = bench.GPU_REPORT_ARCHS[0]
    assert sections["install"]["cuda_available"] in (True, False) and sections["install"]["torchattacks"][0].isdigit()
    # The batched model against each cell alone, every case; on a CPU in float32 within one example of each curve
    # window and weights allclose at test_vectorised.py's atol, bf16 within the bounds it states.
    correctness = sections["correctness"]
    cases = {row["unit"]: row for row in correctness["rows"]}
    assert list(cases) == [case.name for case in bench.CHECK_CASES] and correctness["ok"]
    for row in cases.values():
        assert row["ok"] and row["same_rows"] and row["same_status"] and row["frozen_moved"] == 0
        assert row["max_curve_examples"] <= 1 and row["weights_atol_needed"] <= row["bounds"]["weights_atol"]
    assert cases["resume_adamw"]["resumed"] and cases["bf16"]["precision"] == "bf16"
    assert max(row["weights_atol_needed"] for row in cases.values() if row["precision"] == "fp32") <= 2e-5
    # Throughput, each figure measured (a zero or a missing figure fails here).
    [batched] = sections["batched"]["rows"]
    assert (batched["arch"], batched["n_cells"]) == (arch, bench.QUICK_SIZES.pack_sizes[0])
    assert min(batched[k] for k in ("vectorised_samples_per_s", "speedup", "effective_tflops", "peak_rss_mib")) > 0
    [shared] = sections["shared"]["rows"]
    assert shared["arch"] == arch and shared["packs"] == bench.SHARED_PACKS == len(shared["per_pack_samples_per_s"])
    assert min(shared["alone_samples_per_s"], shared["together_samples_per_s"], *shared["per_pack_samples_per_s"],
               *shared["peak_rss_mib"], shared["overlap"]) > 0
    attacks = sections["attack"]["rows"]
    assert {(row["arch"], row["attack"]) for row in attacks} == {(arch, "fgsm"), (arch, "pgd"), (arch, "feature_pgd")}
    assert all(row["examples_per_s"] > 0 and row["example_steps_per_s"] >= row["examples_per_s"] for row in attacks)
    [score] = sections["score"]["rows"]
    assert score["arch"] == arch and score["loop_per_s"] > 0 and score["best_per_s"] >= score["loop_per_s"]
    # The seed grid projected from those rates, the attack stage counted beside training.
    projection = sections["projection"]
    assert all(hours > 0 for hours in projection["hours"].values()) and set(projection["hours"]) == {
        "training", "estimate", "attack_generation", "attack_scoring"}
    assert projection["cells"]["attack_sets"] == sum(projection["attack_sets"].values()) > 0
    assert 0 < projection["attack_share"] < 1 and projection["total_hours_four_packs"] > 0
    assert projection["flop_model_total_hours"] > 0
    assert "FAILED" not in done.stderr and "gpu report took" in done.stderr
    assert server.read_server_file(tmp_path / "runs") is None, "no server left running in the user's runs folder"


def test_a_failed_section_is_reported_on_its_line_and_the_rest_still_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from xfer.cli.tools import run_bench

    # The projection needs the rates of sections not run here, so it fails; install before it and the report after
    # it still come out, and the exit status says something failed.
    code = run_bench(["--gpu-report", "--device", "cpu", "--quick", "--json", "--sections", "projection", "install"])
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and [line["section"] for line in lines] == ["install", "projection", "report"]
    install, projection, report = lines
    assert "error" not in install and install["torch"]
    assert projection["error"].startswith("RuntimeError: nothing to project from") and "Traceback" in projection["traceback"]
    assert report["failed"] == ["projection"] and report["sections"]["install"] == {k: v for k, v in install.items() if k != "section"}
    assert "projection: FAILED (RuntimeError" in err
