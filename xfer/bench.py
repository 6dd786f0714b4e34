"""Benchmark: the seed's input pipeline against xfer's loop, side by side, same arch, data and epochs.

    xfer bench [--arch resnet_mini] [--dataset mnist5k] [--epochs 10] [--target 0.97]   (or python -m xfer.bench)
    xfer bench --transfer [--sources glyph_digits glyph_letters] [--size 500] [--seeds 0 1 2]
    xfer bench --pack [--archs resnet_mini lenet5 mlp_mixer] [--cells 6] [--json]
    xfer bench --score [--archs resnet_mini alexnet_mini mlp_mixer] [--targets 8] [--n 1000] [--json]
    xfer bench --estimate [--archs resnet_mini alexnet_mini mlp_mixer] [--n 5000] [--json]

Seed style = torchvision Dataset of PIL images + DataLoader + ToTensor/Normalize, batch 64, fp32.
xfer = uint8 tensors on the device, permutation batches, per-batch normalisation (bf16 + channels_last
on CUDA), batch 128. Each pipeline runs in its own process so peak memory is its own.

`--pack` runs the same K cells through the grid's real path (MLflow server, Ray Tune, one MLflow run per
cell) twice side by side: one Tune trial per cell (`--pack-size 1`) and one packed trial, on a Ray of one
slot so both see the same parallelism; it prints cells/hour and samples/s of each (`--json`: a list of rows
``{"device", "arch", "cells", "cells_per_hour": {...}, "samples_per_s": {...}}``).

`--score` times the attack stage's scoring (`xfer.stacked`): `targets` untrained models of each arch predicting
the same `n` random images, one target after another against one stacked model (vmap), after a warm-up each way;
it prints target-examples scored per second both ways and their ratio (`--json`: rows ``{"arch", "device",
"targets", "examples", "loop_per_s", "stacked_per_s", "ratio"}``).

`--estimate` times the estimate stage's work per (pretrained model, target) pair (`xfer.estimate.bench`): the
forward pass over `n` of the target's training images that gives the body's features and the source head's softmax,
then LEEP, NCE, H-score and LogME each, on one CPU thread (`--json`: rows ``{"arch", "device", "examples",
"feature_dim", "features_s", "leep_s", "nce_s", "h_score_s", "logme_s", "total_s"}``).

`--transfer` prints the foundation's transfer figure: `arch` pretrained on each glyph source, then
fine-tuned (all layers, new head) on `size` MNIST-5k digits, against the same arch from scratch on the
same digits, same epochs, per seed; test accuracy on MNIST-5k's 1,000 test digits.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xfer import data, models, server
from xfer import train as loop
from xfer.specs import TrainSpec


@dataclass
class Measured:
    pipeline: str
    device: str
    samples_per_s: float
    seconds_to_target: float   # nan if never reached
    final_acc: float
    peak_mem_mb: float


def _seed_style(ds: data.Dataset, arch: str, epochs: int, device: torch.device, target: float) -> tuple[float, float, float]:
    """The seed's pipeline: every sample goes through PIL and ToTensor/Normalize in a DataLoader."""
    import torchvision.transforms as T
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    mean, std = data.channel_stats(ds.train)
    transform = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    class SeedDataset(Dataset):
        def __init__(self, split: data.Split) -> None:
            self.images, self.labels = split.images.numpy(), split.labels.numpy()

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            image = self.images[i]
            pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
            return transform(pil), int(self.labels[i])

    torch.manual_seed(0)
    model = models.build(arch, ds.in_shape, ds.num_classes).to(device)  # normalisation is in the transform
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
    train_loader = DataLoader(SeedDataset(ds.train), batch_size=64, shuffle=True)
    test_loader = DataLoader(SeedDataset(ds.test), batch_size=1000)
    seen, train_seconds, to_target, acc = 0, 0.0, float("nan"), 0.0
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        epoch_start = time.perf_counter()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
        train_seconds += time.perf_counter() - epoch_start
        model.eval()
        with torch.no_grad():
            correct = sum((model(x.to(device)).argmax(1).cpu() == y).sum().item() for x, y in test_loader)
        acc = correct / len(ds.test)
        if acc >= target and to_target != to_target:
            to_target = time.perf_counter() - start
    return seen / train_seconds, to_target, acc


def _xfer(ds: data.Dataset, arch: str, epochs: int, device: torch.device, target: float) -> tuple[float, float, float]:
    spec = TrainSpec(arch=arch, dataset=ds.name, epochs=epochs, batch_size=128, lr=2e-3, val_size=0)
    splits = data.make_splits(ds, None, 0, 0)
    model = loop.prepare_model(spec, splits)
    reached: list[float] = []

    def report(record: dict) -> None:
        if record["kind"] == "epoch" and 1 - record["test_error"] >= target and not reached:
            reached.append(record["seconds"])

    result = loop.train(spec, splits, model, report=report, device=device)
    train_seconds = result.metrics["seconds"]
    return result.metrics["steps"] * spec.batch_size / train_seconds, reached[0] if reached else float("nan"), result.metrics["test_acc"]


def _child(name: str, dataset: str, arch: str, epochs: int, device: str, target: float, out: mp.Queue) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ds = data.load(dataset)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fn = _seed_style if name == "seed-style" else _xfer
    rate, to_target, acc = fn(ds, arch, epochs, dev, target)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out.put(Measured(name, device, rate, to_target, acc, peak))


def measure(dataset: str, arch: str, epochs: int, device: str, target: float) -> list[Measured]:
    ctx = mp.get_context("spawn")
    rows = []
    for name in ("seed-style", "xfer"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, dataset, arch, epochs, device, target, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    return rows


def table(rows: list[Measured], target: float) -> str:
    lines = [f"| pipeline | device | samples/s | s to {target:.0%} test acc | final test acc | peak memory (MiB) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.pipeline} | {r.device} | {r.samples_per_s:,.0f} | {r.seconds_to_target:.1f} | "
                     f"{r.final_acc:.4f} | {r.peak_mem_mb:,.0f} |")
    base, ours = rows[0], rows[1]
    lines.append(f"\nxfer / seed-style on {base.device}: {ours.samples_per_s / base.samples_per_s:.2f}× samples/s, "
                 f"{ours.peak_mem_mb / base.peak_mem_mb:.2f}× peak memory ({'GPU allocated' if base.device.startswith('cuda') else 'process RSS'})")
    return "\n".join(lines)


def transfer(sources: list[str], arch: str, size: int, seeds: list[int], epochs: int, pretrain_epochs: int,
             pretrain_size: int, target: str = "mnist5k") -> str:
    """Fine-tuned-from-source vs scratch test accuracy on `size` target examples, per seed (a Markdown table)."""
    tgt = data.load(target)
    rows: dict[str, list[float]] = {"scratch": []}
    for seed in seeds:
        splits = data.make_splits(tgt, size, 300, seed)
        spec = TrainSpec(arch=arch, dataset=target, size=size, val_size=300, epochs=epochs, batch_size=64, lr=2e-3, seed=seed)
        rows["scratch"].append(loop.train(spec, splits, loop.prepare_model(spec, splits)).metrics["test_acc"])
        for source in sources:
            src = data.load(source)
            pre_splits = data.make_splits(src, pretrain_size, 300, seed)
            pre_spec = TrainSpec(arch=arch, dataset=source, size=pretrain_size, val_size=300, epochs=pretrain_epochs,
                                 batch_size=128, lr=2e-3, seed=seed)
            pretrained = loop.prepare_model(pre_spec, pre_splits)
            loop.train(pre_spec, pre_splits, pretrained)
            model = loop.prepare_model(spec, splits, pretrained)
            rows.setdefault(f"{source} → {target}", []).append(loop.train(spec, splits, model).metrics["test_acc"])
    lines = [f"| {arch}, {size} {target} digits, {epochs} epochs | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for name, accs in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.4f}" for a in accs) + f" | {sum(accs) / len(accs):.4f} |")
    return "\n".join(lines)


# ---- packs: one trial per cell against one packed trial, the grid's real path ------------------------

PACK_ARCHS = ("resnet_mini", "lenet5", "mlp_mixer")


PACK_PATHS = (("trial_per_cell", False), ("packed_sequential", False), ("packed_vectorised", True))


def pack_rows(archs: Sequence[str], cells: int, size: int, epochs: int, devices: Sequence[str],
              echo: Callable[[str], None] = print, gpu_share: float = 0.25) -> list[dict[str, Any]]:
    """Cells/hour and samples/s of `cells` pretrain cells per arch and device: a trial per cell, one packed trial
    training them one after another, and one packed trial training them as one batched model.

    Runs the grid's real path (MLflow server, Ray Tune, a run per cell) in a temporary runs folder. On a CPU Ray
    has one slot, so no path gains from parallelism and the ratio is orchestration; on CUDA the trial per cell
    takes `gpu_share` of the GPU (several share it, as a grid's trials do) and a pack takes the whole GPU.
    """
    import tempfile

    import ray

    from xfer import names, progress, stages
    from xfer.specs import PretrainSpec

    rows = []
    with tempfile.TemporaryDirectory(prefix="xfer-bench-") as runs, _runs_folder(runs):
        dataset = data.load("mnist5k")
        for device in devices:
            cuda = device == "cuda"
            slots = int(round(1 / gpu_share)) if cuda else 1
            with progress.redirected(Path(runs) / "ray.log"):   # Ray's start-up banner is not a figure
                ray.init(num_cpus=slots, num_gpus=1 if cuda else 0, include_dashboard=False, configure_logging=False,
                         runtime_env={"env_vars": server.worker_env()}, logging_level="ERROR", log_to_driver=False)
            try:
                for arch in archs:
                    grid = [PretrainSpec(TrainSpec(arch=arch, dataset="mnist5k", size=size, val_size=300, epochs=epochs,
                                                   batch_size=64, lr=1e-3 * (1 + seed % 3), seed=seed))
                            for seed in range(cells)]
                    row: dict[str, Any] = {"device": device, "arch": arch, "cells": cells, "cells_per_hour": {},
                                           "samples_per_s": {}}
                    for path, batched in PACK_PATHS:
                        options = stages.RunOptions(
                            experiment=f"bench-{device}-{arch}-{path}", verbose=False,
                            gpus_per_trial=(gpu_share if path == "trial_per_cell" else 1.0) if cuda else 0.0,
                            pack_size=1 if path == "trial_per_cell" else cells, vectorise="always" if batched else "never")
                        began = time.perf_counter()
                        summary = stages.run_stage(names.PRETRAIN, grid, stages.TRAINING, options, {"mnist5k": dataset})
                        wall = time.perf_counter() - began
                        if summary.ran != cells:
                            raise RuntimeError(f"bench cells failed: {summary.failed}")
                        row["cells_per_hour"][path] = cells / wall * 3600
                        row["samples_per_s"][path] = cells * size * epochs / wall
                    rows.append(row)
                    base = row["cells_per_hour"]["trial_per_cell"]
                    echo(f"{device:<5} {arch:<12} " + "  ".join(
                        f"{path} {rate:7.0f} cells/h ({rate / base:.2f}×)" for path, rate in row["cells_per_hour"].items()))
            finally:
                ray.shutdown()
    return rows


@contextlib.contextmanager
def _runs_folder(runs: str) -> Iterator[None]:
    """A temporary runs folder with its own MLflow server for the block; the caller's settings restored after."""
    import os


    saved = {k: os.environ.get(k) for k in (server.RUNS_ENV, server.TRACKING_URI_ENV)}
    os.environ[server.RUNS_ENV] = runs
    os.environ.pop(server.TRACKING_URI_ENV, None)
    try:
        server.ensure_server(runs)
        yield
    finally:
        server.stop_server(runs)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---- the GPU report: everything a lent GPU should measure, in one call ---------------------------------

GPU_REPORT_ARCHS = ("resnet_mini", "alexnet_mini", "mlp_mixer", "lenet5")


def gpu_report(device: str = "cuda", quick: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Install check, correctness of the batched model against one cell at a time, cells/hour of the three paths,
    batched throughput and peak memory per arch at the seed's sizes, the projected seed-grid time, and scoring
    many targets one after another against stacked.

    Sized to finish in well under 8 minutes on one H100-class GPU; `quick` shrinks every size for a CPU check of
    the script itself (its figures then mean nothing).
    """
    import platform

    from xfer import plan as plans
    from xfer import vectorised

    report: dict[str, Any] = {"device": device}
    began = time.perf_counter()
    # 1. What is installed.
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
    report["install"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device_name": name,
                         "bf16": bool(device == "cuda" and torch.cuda.is_bf16_supported()),
                         "cuda_available": torch.cuda.is_available()}
    echo(f"install: torch {torch.__version__}, CUDA {torch.version.cuda}, device {name}, "
         f"bf16 {report['install']['bf16']}")
    # 2. Correctness: each batched cell against the same cell trained alone, on this device, in float32 (the tight
    # check of the maths) and in bf16 (the arithmetic GPU cells run: the batched template casts as autocast does).
    report["correctness"] = [_batched_matches_alone(device, quick, precision) for precision in ("fp32", "bf16")]
    for c in report["correctness"]:
        echo(f"correctness ({c['arch']}, {c['cells']} cells, {c['epochs']} epochs, {c['precision']}): largest curve "
             f"difference {c['max_curve_diff']:.4f}, final test error difference {c['max_final_diff']:.4f} "
             f"(tolerance {c['tolerance']:.3f}): {'ok' if c['ok'] else 'TOO FAR'}")
    # 3. The grid's real path, three ways.
    # quick: one arch checks every section's code; each arch more costs three Tune runs (~25 s on a 2-core CPU).
    archs = GPU_REPORT_ARCHS[:1] if quick else GPU_REPORT_ARCHS
    report["paths"] = pack_rows(archs, 2 if quick else 16, 200 if quick else 1000, 1, [device], echo)
    # 4. The batched model alone at the seed's batch size: throughput, speed-up and peak memory per arch.
    report["batched"] = []
    for arch in archs:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row = vectorised.bench_pack(arch, 4 if quick else 32, device, 3 if quick else 20, 16 if quick else 128)
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
        report["batched"].append(row)
        echo(f"batched {arch:<12} {row['n_cells']} cells: {row['vectorised_samples_per_s']:,.0f} samples/s "
             f"({row['speedup']:.2f}× one cell at a time), peak {row['peak_memory_mib']:,.0f} MiB")
    # 5. The seed grid's training on this device: its examples per arch over the batched throughput measured here.
    report["seed_grid_hours"] = _projected_seed_grid(report["batched"], plans) / 3600
    echo(f"projected seed grid (training stages, packs of 32 as one batched model, one {name}): "
         f"{report['seed_grid_hours']:.2f} h")
    # 6. Scoring: the attack stage's targets one after another against one stacked model. Its own failure is
    # recorded, not raised, so the figures above still come back.
    report["score"] = _section("score", echo, lambda: _score_rows(archs, device, quick, echo))
    report["seconds"] = time.perf_counter() - began
    echo(f"gpu report took {report['seconds']:.0f} s")
    return report


def _section(name: str, echo: Callable[[str], None], measure: Callable[[], Any]) -> Any:
    """A report section's figures, or {"error": ...} when it fails: one broken section must not cost a lent GPU's
    whole report."""
    try:
        return measure()
    except Exception as exc:   # any failure: the report's other sections are still worth returning
        echo(f"{name}: FAILED ({type(exc).__name__}: {exc})")
        return {"error": f"{type(exc).__name__}: {exc}"}


def _score_rows(archs: Sequence[str], device: str, quick: bool, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Target-examples/s of a set of targets scored one after another and as one stacked model (`xfer.stacked`)."""
    from xfer import stacked

    return stacked.bench(archs, 2 if quick else 16, 64 if quick else 5000, [device], echo)


# How far a batched cell's final test error may be from the same cell alone: float32 on a CPU agrees within one
# example of a 64-example window; CUDA's float32 convolutions use TF32 by default (cudnn.allow_tf32), and bf16
# rounds at ~3 digits, which moves a few percent of examples over two epochs.
CORRECTNESS_TOLERANCE = {("cpu", "fp32"): 1 / 64 + 1e-6, ("cuda", "fp32"): 2 / 64, ("cpu", "bf16"): 0.05,
                         ("cuda", "bf16"): 0.05}


def _batched_matches_alone(device: str, quick: bool, precision: str = "fp32") -> dict[str, Any]:
    from xfer import vectorised

    arch, cells, epochs = "resnet_mini", 3, 1 if quick else 2
    ds = data.load("mnist5k")
    specs = [TrainSpec(arch=arch, dataset="mnist5k", size=300 if quick else 1000, val_size=200, epochs=epochs,
                       batch_size=64, lr=1e-3 * (1 + i), seed=i, precision=precision) for i in range(cells)]
    splits = [data.make_splits(ds, s.size, s.val_size, s.seed) for s in specs]
    alone = [loop.train(s, d, loop.prepare_model(s, d), device=device) for s, d in zip(specs, splits)]
    together = vectorised.train_many(specs, splits, [loop.prepare_model(s, d) for s, d in zip(specs, splits)], device=device)
    curve = max(abs(a["error"] - b["error"]) for x, y in zip(alone, together) for a, b in zip(x.curve, y.curve))
    final = max(abs(x.metrics["test_error"] - y.metrics["test_error"]) for x, y in zip(alone, together))
    tolerance = CORRECTNESS_TOLERANCE[("cuda" if device == "cuda" else "cpu", precision)]
    return {"arch": arch, "cells": cells, "epochs": epochs, "precision": precision,
            "max_curve_diff": curve, "max_final_diff": final, "tolerance": tolerance, "ok": final <= tolerance}


def _projected_seed_grid(batched: list[dict[str, Any]], plans: Any) -> float:
    """Seconds for the seed grid's training cells (published sizes) at the batched throughput measured per arch;
    an arch not measured takes the slowest measured rate."""
    from xfer import grid as grids

    grid = grids.from_preset("seed")
    pools = {name: train for name, (train, *_rest) in data.PUBLISHED.items()}
    cells = grids.cells(grid, pools)
    rate = {row["arch"]: row["vectorised_samples_per_s"] for row in batched}
    slowest = min(rate.values())
    seconds = 0.0
    for spec in (*cells.pretrain, *cells.finetune, *cells.scratch):
        t = spec.train
        examples = (t.size or pools[t.dataset] - t.val_size) * t.epochs
        seconds += examples * (1 + plans.EVAL_COST * 0.2) / rate.get(t.arch, slowest)
    return seconds


if __name__ == "__main__":   # `python -m xfer.bench ...` is `xfer bench ...`
    import sys

    from xfer.cli import main, run_main

    run_main(lambda: main(["bench", *sys.argv[1:]]))
