"""Benchmark: the seed's input pipeline against xfer's loop, side by side, same arch, data and epochs.

    xfer bench [--arch resnet_mini] [--dataset mnist5k] [--epochs 10] [--target 0.97]   (or python -m xfer.bench)
    xfer bench --transfer [--sources glyph_digits glyph_letters] [--size 500] [--seeds 0 1 2]
    xfer bench --pack [--archs resnet_mini lenet5 mlp_mixer] [--cells 6] [--json]
    xfer bench --score [--archs resnet_mini alexnet_mini mlp_mixer] [--targets 8] [--n 1000] [--json]
    xfer bench --estimate [--archs resnet_mini alexnet_mini mlp_mixer] [--n 5000] [--json]
    xfer bench --gpu-report [--json] [--sections ...] [--paths]   (--device cpu --quick: a check of the script)

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

`--estimate` times the estimate stage's work per (pretrained model, target) pair (`estimate_rows`): the
forward pass over `n` of the target's training images that gives the body's features and the source head's softmax,
then LEEP, NCE, H-score and LogME each, on one CPU thread (`--json`: rows ``{"arch", "device", "examples",
"feature_dim", "features_s", "leep_s", "nce_s", "h_score_s", "logme_s", "total_s"}``).

`--gpu-report` is the one call a lent GPU gets (its default sections' budgets sum to 6 min 20 s, so one 10-minute call
holds it; it has not yet run on a GPU).
Its sections run in this order, each on its own (a failure becomes that section's, or that unit's, {"error",
"traceback"} and the rest runs) and each in a time budget (`SECTION_BUDGET_S`: once spent, its units left are skipped
and named): install; correctness (each batched cell against the same cell alone — SGD with freezing, dropout,
augmentation with unfreezing, AdamW resumed from epoch states, all float32 with TF32 off, and bf16 — curves in examples
of their windows, weights, frozen tensors, against stated bounds); batched (per seed arch and seed pack size: one pack
batched vs its cells one after another, peak memory, effective TFLOP/s); shared (four processes each training a pack at
once, as a grid's trials share a GPU, against one alone: throughput, each process's peak memory, the device's memory in
use); attack (FGSM, PGD and feature-PGD generation, examples/s per arch); score (one target after another vs stacked);
projection (the seed grid's hours on this device from those rates: training, the estimate stage, and the attack stage's
generation and scoring; beside it the plan's FLOP model); and, with `--paths`, last, the grid's Ray + MLflow path
three ways (`--pack`). `--json`: stdout is JSON Lines, one ``{"section": NAME, ...}`` flushed as each section ends and
``{"section": "report", "device", "quick", "seconds", "failed", "skipped", "sections": {NAME: ...}}`` last; the lines
for people go to stderr. Exit status 1 if anything failed (a section, a unit, a correctness case out of bounds).

`--transfer` prints the foundation's transfer figure: `arch` pretrained on each glyph source, then
fine-tuned (all layers, new head) on `size` MNIST-5k digits, against the same arch from scratch on the
same digits, same epochs, per seed; test accuracy on MNIST-5k's 1,000 test digits.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
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
from xfer.errors import XferError
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

    from xfer import names, progress, stages, training_cells, vectorised
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
                        summary = stages.run_stage(names.PRETRAIN, grid, training_cells.TRAINING, options, {"mnist5k": dataset})
                        wall = time.perf_counter() - began
                        if summary.ran != cells:
                            raise RuntimeError(f"bench cells failed: {summary.failed}")
                        row["cells_per_hour"][path] = cells / wall * 3600
                        row["samples_per_s"][path] = cells * size * epochs / wall
                    row |= vectorised.optimiser_memory(models.build(arch, dataset.in_shape, dataset.num_classes), cells,
                                                       grid[0].train.optimizer)
                    rows.append(row)
                    base = row["cells_per_hour"]["trial_per_cell"]
                    echo(f"{device:<5} {arch:<12} " + "  ".join(
                        f"{path} {rate:7.0f} cells/h ({rate / base:.2f}×)" for path, rate in row["cells_per_hour"].items())
                        + f"  batched optimiser keeps {row['optimiser_mib']:.1f} MiB "
                          f"(per-element layout: {row['optimiser_mib_per_element_layout']:.1f} MiB)")
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


# ---- the attack stage's generation: PGD examples per second ------------------------------------------

def attack_rows(n: int = 1000, steps: int = 10, arch: str = "resnet_mini", devices: Sequence[str] | None = None,
                echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time generating `n` PGD examples (eps 0.3, `steps` steps) on `arch` over mnist5k, per device."""
    from xfer.attack import generate
    from xfer.specs import AttackSpec

    devices = list(devices) if devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    test = data.load("mnist5k").test
    images, labels = test.images[:n], test.labels[:n]
    model = models.build(arch, tuple(images.shape[1:]), 10)
    spec = AttackSpec(attack="pgd", eps=0.3, steps=steps, n=len(labels), dataset="mnist5k")
    rows = []
    echo(f"PGD generation, {arch}, {len(labels)} examples, {steps} steps, torch {torch.__version__}, "
         f"{torch.get_num_threads()} CPU threads")
    echo(f"{'device':<28} {'seconds':>8} {'examples/s':>11}")
    for name in devices:
        device = torch.device(name)
        generate(model, images[:32], labels[:32], spec, device)  # warm-up: kernel selection, allocator
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        generate(model, images, labels, spec, device)  # returns on the CPU: the copy back synchronises
        seconds = time.perf_counter() - began
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        rows.append({"device": label, "examples": len(labels), "seconds": seconds, "examples_per_s": len(labels) / seconds})
        echo(f"{label:<28} {seconds:>8.2f} {len(labels) / seconds:>11.1f}")
    return rows


# ---- the estimate stage's work: seconds per (pretrained model, target) pair ------------------------------

ESTIMATE_ARCHS = ("resnet_mini", "alexnet_mini", "mlp_mixer")
ESTIMATE_N = 5000         # target images per pair (MNIST-5k's training pool)


def estimate_rows(archs: Sequence[str], n: int = 5000, dataset: str = "mnist5k", devices: Sequence[str] = ("cpu",),
                  threads: int = 1, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Seconds per (model, target) pair for each estimator and for the forward pass, per arch: an untrained model
    of each arch (the cost does not depend on the weights) scored on `n` images of `dataset`'s training pool, after
    a warm-up pass. Rows ``{"arch", "device", "examples", "feature_dim", "features_s", "leep_s", …, "total_s"}``."""
    from xfer import estimators, names
    from xfer.estimate import BATCH, measure, pool

    target = data.load(dataset)
    images, labels = pool(target, n)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for device in devices:
            for arch in archs:
                torch.manual_seed(0)
                model = models.build(arch, target.in_shape, 10).to(device)
                estimators.features_and_probs(model, images[:BATCH["cpu"]])   # warm-up: kernels, allocator
                metrics = measure(model, images, labels, len(target.class_names))
                row = {"arch": arch, "device": device, "examples": len(labels), "feature_dim": model.head.in_features,
                       "features_s": metrics[names.FEATURES_SECONDS],
                       **{f"{name}_s": metrics[f"{name}_seconds"] for name in estimators.ESTIMATORS}}
                row["total_s"] = row["features_s"] + sum(row[f"{name}_s"] for name in estimators.ESTIMATORS)
                rows.append(row)
                echo(f"{arch:<15} {device:<5} n={len(labels):,} D={row['feature_dim']:<4} forward {row['features_s']:.2f} s  "
                     + "  ".join(f"{name} {row[f'{name}_s']:.3f} s" for name in estimators.ESTIMATORS)
                     + f"  = {row['total_s']:.2f} s per pair")
    finally:
        torch.set_num_threads(before)
    return rows


# ---- the GPU report: everything a lent GPU should measure, in one call ---------------------------------

GPU_REPORT_ARCHS = ("resnet_mini", "alexnet_mini", "mlp_mixer", "mlp_mixer2")   # the seed grid's; --quick: the first
# In the order they run: the GPU-bound sections first, so a call cut short has them; the projection from their rates;
# `paths` (the grid's Ray + MLflow path) only when asked, last: its short cells time trial start-up and MLflow runs,
# which are the same with or without a GPU (`xfer bench --pack` measures them anywhere).
REPORT_SECTIONS = ("install", "correctness", "batched", "shared", "attack", "score", "projection", "paths")
DEFAULT_SECTIONS = REPORT_SECTIONS[:-1]
# Seconds in which a section may start another unit (an arch, a case); a unit under way finishes. The default
# sections' budgets sum to 6 min 20 s, so a 10-minute lent call holds them, the machine's start and an overrun.
SECTION_BUDGET_S = {"install": 30, "correctness": 60, "batched": 100, "shared": 100, "attack": 45, "score": 45,
                    "projection": 30, "paths": 300}
SHARED_PACKS = 4          # packed trials sharing one GPU in a grid (cluster.GPU_SHARE: 0.25 GPU a trial)
WAIT_S = 120              # beyond its budget, how long the report waits for a pack process before giving up on it


@dataclass(frozen=True)
class ReportSizes:
    """Every size the GPU report uses. QUICK checks the script on a CPU in seconds; its figures mean nothing."""

    archs: tuple[str, ...]
    check_size: int          # correctness: training examples per cell (2 epochs); the sizes tests/test_vectorised.py
    check_val: int           # pins its bounds at (resnet_mini amplifies float-order noise: at 4× the steps, running
                             # variances move ~1e-3 apart in float32, SGD, on one CPU, with both paths right)
    check_test: int
    check_batch: int
    check_log_every: int
    pack_sizes: tuple[int, ...] | None   # batched: cells per pack; None = the sizes the seed grid's packs have
    pack_steps: int
    pack_batch: int          # the seed grid's batch size
    shared_steps: int        # four processes' timed windows must overlap: longer than one pack's
    attack_n: int            # examples generated per (arch, attack)
    attack_steps: int        # the seed grid's attack_steps
    score_targets: int
    score_n: int
    paths_cells: int
    paths_size: int


FULL_SIZES = ReportSizes(GPU_REPORT_ARCHS, check_size=64, check_val=32, check_test=64, check_batch=16,
                         check_log_every=3, pack_sizes=None, pack_steps=30, pack_batch=128, shared_steps=60,
                         attack_n=2000, attack_steps=10, score_targets=16, score_n=5000, paths_cells=16, paths_size=1000)
QUICK_SIZES = ReportSizes(GPU_REPORT_ARCHS[:1], check_size=64, check_val=32, check_test=64, check_batch=16,
                          check_log_every=3, pack_sizes=(2,), pack_steps=2, pack_batch=16, shared_steps=3, attack_n=16,
                          attack_steps=2, score_targets=2, score_n=64, paths_cells=2, paths_size=200)


def gpu_report(device: str = "cuda", quick: bool = False, echo: Callable[[str], None] = print,
               emit: Callable[[dict[str, Any]], None] | None = None,
               sections: Sequence[str] = DEFAULT_SECTIONS) -> dict[str, Any]:
    """Each section in `REPORT_SECTIONS` order that `sections` names, each on its own: a failure is recorded as
    {"error", "traceback"} and the rest still runs. `emit` receives ``{"section": NAME, ...}`` as each section ends
    and ``{"section": "report", ...}`` (every section's payload, and what failed) last; `echo` the lines for people.
    """
    unknown = sorted(set(sections) - set(REPORT_SECTIONS))
    if unknown:
        raise XferError(f"unknown --gpu-report sections {', '.join(unknown)}; they are {', '.join(REPORT_SECTIONS)}.")
    sizes = QUICK_SIZES if quick else FULL_SIZES
    threads = torch.get_num_threads()
    if device == "cpu" and quick:
        torch.set_num_threads(1)   # on a shared 2-core CPU, OpenMP's barriers under contention cost far more than a thread gains
    try:
        return _report(device, quick, sizes, echo, emit, sections)
    finally:
        torch.set_num_threads(threads)


def _report(device: str, quick: bool, sizes: ReportSizes, echo: Callable[[str], None],
            emit: Callable[[dict[str, Any]], None] | None, sections: Sequence[str]) -> dict[str, Any]:
    began = time.perf_counter()
    done: dict[str, dict[str, Any]] = {}
    measures: dict[str, Callable[[float], dict[str, Any]]] = {
        "install": lambda deadline: _install(device),
        "correctness": lambda deadline: _correctness(device, sizes, deadline, echo),
        "batched": lambda deadline: _units("batched", _pack_units(sizes), deadline, device, echo,
                                           lambda unit: _batched_row(*unit, device, sizes, echo)),
        "shared": lambda deadline: _shared(device, sizes, deadline, echo),
        "attack": lambda deadline: _units("attack", [(arch, name) for arch in sizes.archs for name in _attack_names()],
                                          deadline, device, echo, lambda unit: _attack_row(*unit, device, sizes, echo)),
        "score": lambda deadline: _units("score", sizes.archs, deadline, device, echo,
                                         lambda arch: _score_row(arch, device, sizes, echo)),
        "projection": lambda deadline: _projection(done, echo),
        "paths": lambda deadline: {"rows": pack_rows(sizes.archs, sizes.paths_cells, sizes.paths_size, 1, [device], echo)},
    }
    for name in REPORT_SECTIONS:
        if name in sections:
            done[name] = _section(name, measures[name], device, echo, emit)
    failed, skipped = _outcome(done)
    report = _plain({"device": device, "quick": quick, "seconds": time.perf_counter() - began, "failed": failed,
                     "skipped": skipped, "sections": done})
    echo(f"gpu report took {report['seconds']:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "nothing failed")
         + (f"; skipped for time: {', '.join(skipped)}" if skipped else ""))
    if emit is not None:
        emit({"section": "report", **report})
    return report


def _section(name: str, measure: Callable[[float], dict[str, Any]], device: str, echo: Callable[[str], None],
             emit: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """A section's payload (or its failure), with its seconds and budget, handed to `emit` as soon as it ends."""
    began = time.perf_counter()
    budget = SECTION_BUDGET_S[name]
    payload = _guarded(name, device, echo, lambda: measure(began + budget))
    payload = _plain({**payload, "seconds": time.perf_counter() - began, "budget_s": budget})
    if emit is not None:
        emit({"section": name, **payload})
    return payload


def _guarded(label: str, device: str, echo: Callable[[str], None], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`measure()`, or {"error", "traceback"} when it raises: one broken part must not cost a lent GPU's report."""
    import traceback

    try:
        return measure()
    except Exception as exc:   # any failure: the report's other parts are still worth measuring
        trace = traceback.format_exc()
        echo(f"{label}: FAILED ({type(exc).__name__}: {exc})\n{trace}")
        if device == "cuda":
            torch.cuda.empty_cache()   # after an out-of-memory error the cached blocks would starve the next part
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": trace[-3000:]}


def _units(section: str, units: Sequence[Any], deadline: float, device: str, echo: Callable[[str], None],
           measure: Callable[[Any], dict[str, Any]], stop_on_error: bool = False) -> dict[str, Any]:
    """A row per unit ({"unit": "resnet_mini/24", ...}), a failed unit's row its error; once `deadline` has passed
    (the first unit always runs), or after an error with `stop_on_error`, the units left are listed as skipped."""
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for unit in units:
        name = "/".join(map(str, unit)) if isinstance(unit, tuple) else str(unit)
        if rows and (time.perf_counter() > deadline or (stop_on_error and "error" in rows[-1])):
            skipped.append(name)
            continue
        rows.append({"unit": name, **_guarded(f"{section} {name}", device, echo, lambda: measure(unit))})
    if skipped:
        echo(f"{section}: skipped {', '.join(skipped)} ({'after an error' if 'error' in rows[-1] else 'budget spent'})")
    return {"rows": rows, "skipped": skipped}


def _outcome(done: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """What failed (a section, a unit's error, a correctness case out of its bounds) and what was skipped for time."""
    failed, skipped = [], []
    for name, payload in done.items():
        if "error" in payload:
            failed.append(name)
        failed += [f"{name}/{row['unit']}" for row in payload.get("rows", []) if "error" in row or row.get("ok") is False]
        skipped += [f"{name}/{unit}" for unit in payload.get("skipped", [])]
    return failed, skipped


def _plain(value: Any) -> Any:
    """Strict JSON values: a non-finite float (a rate never measured) becomes null, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _install(device: str) -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                            "cuda_available": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"device_name": props.name, "devices": torch.cuda.device_count(), "capability": f"{props.major}.{props.minor}",
                 "memory_mib": props.total_memory / 2**20, "multiprocessors": props.multi_processor_count,
                 "bf16": torch.cuda.is_bf16_supported(), "cudnn": torch.backends.cudnn.version(),
                 "tf32_convolutions": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                 "kernel_ran": torch.ones(8, device="cuda").sum().item() == 8}   # a kernel runs, not just a driver answers
    else:
        info |= {"device_name": platform.processor() or platform.machine(), "bf16": False}
    try:
        import torchattacks   # the attack section's library

        info["torchattacks"] = torchattacks.__version__
    except ImportError as exc:
        info["torchattacks"] = f"missing ({exc})"
    return info


# -- correctness: each batched cell against the same cell trained alone, on this device ----------------------------

@dataclass(frozen=True)
class _Case:
    name: str
    what: str
    arch: str
    cells: tuple[dict[str, Any], ...]   # each cell's TrainSpec fields beside the common ones (SGD, 2 epochs)
    colour: bool = False                # synthetic 3×32×32 images (augmentation's kind of set), else MNIST-5k digits
    resume: bool = False                # the pack resumes from each alone cell's epoch-1 state, as a restarted trial does
    precision: str = "fp32"
    cuda_statistical: str = ""          # why, on CUDA, only the final test errors can be compared


CHECK_CASES = (
    _Case("sgd_freeze", "SGD, weight decay, momentum, freeze depths 4 and 2, head lr ×10", "resnet_mini", (
        {"lr": 0.005, "weight_decay": 0.0, "seed": 0},
        {"lr": 0.005, "weight_decay": 0.3, "seed": 1, "freeze_depth": 4, "head_lr_mult": 10},
        {"lr": 0.002, "weight_decay": 1e-2, "momentum": 0.5, "seed": 2, "freeze_depth": 2})),
    _Case("dropout", "dropout masks per cell", "alexnet_mini", ({"lr": 0.005, "seed": 0}, {"lr": 0.01, "seed": 1}),
          cuda_statistical="F.dropout's CUDA kernel draws other bits than the pack's per-cell bernoulli_ (same rate)"),
    _Case("augment_unfreeze", "random crop + flip on 3×32×32, frozen to depth 4 then unfrozen, label smoothing",
          "resnet_mini", tuple({"lr": lr, "seed": seed, "augment": True, "freeze_depth": 4, "unfreeze_epoch": 1,
                                "label_smoothing": 0.1} for lr, seed in ((0.05, 0), (0.02, 1))), colour=True),
    _Case("resume_adamw", "AdamW + cosine, resumed from the epoch-1 states of the cells alone", "lenet5", (
        {"optimizer": "adamw", "lr": 3e-3, "seed": 0},
        {"optimizer": "adamw", "lr": 1e-3, "seed": 1, "freeze_depth": 2, "head_lr_mult": 10}), resume=True),
    _Case("bf16", "bf16 autocast (a GPU cell's arithmetic)", "resnet_mini", ({"lr": 0.005, "seed": 0}, {"lr": 0.005, "seed": 1}),
          precision="bf16", cuda_statistical="bf16 rounds at ~3 digits, and CUDA's grouped and single convolutions "
                                             "round in other orders"),
)


def _bounds(case: _Case, device: str) -> dict[str, Any]:
    """How close a batched cell must come to the same cell alone (None: not compared).

    CPU: what tests/test_vectorised.py pins — curves within one example of each window, weights allclose at rtol 1e-4
    with atol 2e-6 under SGD, 2e-5 under Adam(W), 5e-3 in bf16. CUDA float32 runs with TF32 off, so the two paths differ
    only in summation order: 10× the CPU's bounds and two examples. These CUDA bounds are not yet measured (no GPU had
    been lent when they were set): each case reports the figures themselves, to set them from.
    """
    adam = any(cell.get("optimizer", "sgd") != "sgd" for cell in case.cells)
    if device != "cuda":
        atol = 5e-3 if case.precision == "bf16" else 2e-5 if adam else 2e-6
        return {"curve_examples": 1, "weights_rtol": 1e-4, "weights_atol": atol, "final_error": None}
    if case.cuda_statistical:
        return {"curve_examples": None, "weights_rtol": None, "weights_atol": None, "final_error": 0.05 if case.precision == "bf16" else 0.1,
                "why": case.cuda_statistical}
    return {"curve_examples": 2, "weights_rtol": 1e-3, "weights_atol": 2e-4 if adam else 2e-5, "final_error": None}


def _correctness(device: str, sizes: ReportSizes, deadline: float, echo: Callable[[str], None]) -> dict[str, Any]:
    payload = _units("correctness", [case.name for case in CHECK_CASES], deadline, device, echo,
                     lambda name: _check_case(next(c for c in CHECK_CASES if c.name == name), device, sizes, echo))
    payload["ok"] = not payload["skipped"] and all(row.get("ok") for row in payload["rows"])
    return payload


def _check_case(case: _Case, device: str, sizes: ReportSizes, echo: Callable[[str], None]) -> dict[str, Any]:
    from xfer import vectorised

    specs, cell_data = _case_cells(case, sizes)
    start = [loop.prepare_model(s, d) for s, d in zip(specs, cell_data)]
    frozen = {i: {n: p.detach().clone() for n, p in models.layers(m)[:s.freeze_depth]}
              for i, (s, m) in enumerate(zip(specs, start)) if s.freeze_depth and s.unfreeze_epoch is None}
    alone_models = [copy.deepcopy(m) for m in start]
    states: list[list[Any]] = [[] for _ in specs]
    fp32 = case.precision == "fp32"
    with _tf32_off(device, fp32):
        alone = [loop.train(s, d, m, device=device, on_epoch_end=st.append)
                 for s, d, m, st in zip(specs, cell_data, alone_models, states)]
        resumes = [st[0] for st in states] if case.resume else None
        batched = vectorised.train_many(specs, cell_data, start, device=device, resumes=resumes)
    bounds = _bounds(case, device)
    batches = [min(s.batch_size, len(d.train)) for s, d in zip(specs, cell_data)]
    figures = _differences(alone, batched, alone_models, start, cell_data, batches, bounds["weights_rtol"] or 1e-4)
    figures["frozen_moved"] = max((float((dict(models.layers(start[i]))[n].detach().cpu() - before).abs().max())
                                   for i, tensors in frozen.items() for n, before in tensors.items()), default=0.0)
    ok = bool(figures["same_rows"] and figures["same_status"] and figures["same_counters"]
              and figures["frozen_moved"] == 0
              and (bounds["curve_examples"] is None or figures["max_curve_examples"] <= bounds["curve_examples"] + 1e-9)
              and (bounds["weights_atol"] is None or figures["weights_atol_needed"] <= bounds["weights_atol"])
              and (bounds["final_error"] is None or figures["max_final_diff"] <= bounds["final_error"] + 1e-12))
    row = {"what": case.what, "arch": case.arch, "cells": len(specs), "epochs": specs[0].epochs,
           "precision": case.precision, "resumed": case.resume, "tf32": False if fp32 and device == "cuda" else None,
           **figures, "bounds": bounds, "ok": ok}
    echo(f"correctness {case.name:<16} {case.arch:<12} {case.precision}: curves within {figures['max_curve_examples']:.2f} "
         f"examples, weights within {figures['max_weight_diff']:.1e} (atol needed {figures['weights_atol_needed']:.1e}), "
         f"final test error within {figures['max_final_diff']:.4f}: {'ok' if ok else 'OUT OF BOUNDS ' + str(bounds)}")
    return row


def _case_cells(case: _Case, sizes: ReportSizes) -> tuple[list[TrainSpec], list[data.Splits]]:
    """The case's specs, and each cell's data: its own subset of the pool, one test sample shared by every cell."""
    common = {"arch": case.arch, "dataset": "synthetic" if case.colour else "mnist5k", "size": sizes.check_size,
              "val_size": sizes.check_val, "epochs": 2, "batch_size": sizes.check_batch,
              "log_every": sizes.check_log_every, "optimizer": "sgd", "precision": case.precision}
    specs = [TrainSpec(**{**common, **cell}) for cell in case.cells]
    if case.colour:
        generator = torch.Generator().manual_seed(0)
        split = (lambda n: data.Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator),
                                      torch.randint(0, 10, (n,), generator=generator)))
        colour = data.Splits(split(sizes.check_size), split(sizes.check_val), split(sizes.check_test),
                             tuple(str(c) for c in range(10)))
        return specs, [colour] * len(specs)
    pool = data.load("mnist5k")
    test = pool.test.subset(torch.randperm(len(pool.test), generator=torch.Generator().manual_seed(0))[:sizes.check_test])
    cell_data = []
    for s in specs:
        own = data.make_splits(pool, s.size, s.val_size, s.seed)
        cell_data.append(data.Splits(own.train, own.val, test, own.class_names))
    return specs, cell_data


def _differences(alone: list[Any], batched: list[Any], alone_models: list[Any], batched_models: list[Any],
                 cell_data: list[data.Splits], batches: list[int], rtol: float) -> dict[str, Any]:
    """How far each batched cell is from the cell alone: curve rows in examples of their windows, final test errors,
    weights (the atol `allclose` would need at `rtol`), and whether rows, statuses and integer buffers are equal."""
    from xfer import names

    curve = final = weights = atol = 0.0
    same_rows = same_status = same_counters = True
    for a, b, ma, mb, d, batch in zip(alone, batched, alone_models, batched_models, cell_data, batches):
        same_status &= (a.status, a.reason) == (b.status, b.reason)
        same_rows &= [(r["step"], r["epoch"], r["split"]) for r in a.curve] == [(r["step"], r["epoch"], r["split"]) for r in b.curve]
        last_step = 0
        for ra, rb in zip(a.curve, b.curve):
            if ra["split"] == "train":   # a train row's window: the steps since the last one (the last may be short)
                window, last_step = (ra["step"] - last_step) * batch, ra["step"]
            else:
                window = len(d.val if ra["split"] == "val" else d.test)
            curve = max(curve, abs(ra["error"] - rb["error"]) * window)
        final = max(final, abs(a.metrics[names.TEST_ERROR] - b.metrics[names.TEST_ERROR]))
        state_b = mb.state_dict()
        for key, value in ma.state_dict().items():
            va, vb = value.detach().cpu(), state_b[key].detach().cpu()
            if va.dtype.is_floating_point:
                diff = (va.float() - vb.float()).abs()
                weights = max(weights, float(diff.max()) if diff.numel() else 0.0)
                atol = max(atol, float((diff - rtol * va.float().abs()).max()) if diff.numel() else 0.0)
            else:
                same_counters &= torch.equal(va, vb)   # BatchNorm's num_batches_tracked
    return {"max_curve_examples": curve, "max_final_diff": final, "max_weight_diff": weights,
            "weights_atol_needed": max(atol, 0.0), "same_rows": same_rows, "same_status": same_status,
            "same_counters": same_counters}


@contextlib.contextmanager
def _tf32_off(device: str, off: bool) -> Iterator[None]:
    """float32 as IEEE float32 on CUDA for the block: TF32 convolutions (cuDNN's default) round inputs to 10 bits,
    which would hide a wrong sum among rounding differences."""
    if device != "cuda" or not off:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# -- throughput and memory: one batched pack, then four sharing the device -------------------------------------------

def _pack_units(sizes: ReportSizes) -> list[tuple[str, int]]:
    """(arch, cells) to time: the largest pack size first (the seed grid's fine-tunes: most of its training)."""
    return [(arch, cells) for cells in sorted(sizes.pack_sizes or _seed_pack_sizes(), reverse=True) for arch in sizes.archs]


def _seed_pack_sizes() -> tuple[int, ...]:
    """The cell counts of the seed grid's training packs on a GPU (packs.plan at packs.PACK_SIZE["cuda"])."""
    from xfer import packs, training_cells

    grid, cells, _ = _seed_grid()
    made = {len(pack) for group in (cells.pretrain, cells.finetune, cells.scratch)
            for pack in packs.plan(list(group), lambda spec: packs.pack_key(training_cells.TRAINING, spec), packs.PACK_SIZE["cuda"])}
    return tuple(sorted(made))


def _batched_row(arch: str, cells: int, device: str, sizes: ReportSizes, echo: Callable[[str], None]) -> dict[str, Any]:
    """One pack of `cells` cells trained one after another and as one batched model (vectorised.bench_pack), its peak
    memory, and the TFLOP/s its batched rate means (the plan's GPU column assumes plan.GPU_TFLOPS)."""
    from xfer import plan as plans
    from xfer import vectorised

    _reset_peak(device)
    row = vectorised.bench_pack(arch, cells, device, sizes.pack_steps, sizes.pack_batch)
    row |= _peak_memory(device)
    row["effective_tflops"] = 3 * plans.flops_per_example(arch, (1, 28, 28), 10) * row["vectorised_samples_per_s"] / 1e12
    row["plan_gpu_tflops"] = plans.GPU_TFLOPS
    # The plan's memory estimate for this pack, beside the peak measured above (CUDA: allocated; CPU: the process's RSS).
    row["estimated_mib"] = plans.pack_memory(arch, (1, 28, 28), 10, cells, sizes.pack_batch,
                                             "adamw")["total_bytes"] / 2**20   # bench_pack's cells: TrainSpec's default
    echo(f"batched {arch:<12} {cells:>3} cells: {row['vectorised_samples_per_s']:,.0f} samples/s "
         f"({row['speedup']:.2f}× one cell at a time), {row['effective_tflops']:.2f} TFLOP/s, "
         + (f"peak {row['peak_allocated_mib']:,.0f} MiB allocated" if device == "cuda" else f"peak RSS {row['peak_rss_mib']:,.0f} MiB (the whole process's)")
         + f", the plan's estimate {row['estimated_mib']:,.0f} MiB")
    return row


def _shared(device: str, sizes: ReportSizes, deadline: float, echo: Callable[[str], None]) -> dict[str, Any]:
    """SHARED_PACKS processes, each training a batched pack of the largest seed pack size, all at once (as a grid's
    trials share a GPU), against the same pack alone in this process: throughput and each process's peak memory."""
    import queue

    # A CUDA process cannot be forked; a fork server that has imported torch and xfer (but touched no device) can be,
    # so the four processes start in a second, not each importing anew (torch, and torch._dynamo, which torch.optim
    # imports at its first optimizer: ~5 s each on a busy 2-core CPU).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "xfer.vectorised", "xfer.train"])
    commands, results = ctx.Queue(), ctx.Queue()
    barrier = ctx.Barrier(SHARED_PACKS)
    threads = 1 if device == "cpu" else torch.get_num_threads()
    workers = [ctx.Process(target=_shared_worker, args=(device, threads, barrier, commands, results), daemon=True)
               for _ in range(SHARED_PACKS)]
    for worker in workers:
        worker.start()
    try:
        cells = max(sizes.pack_sizes or _seed_pack_sizes())
        try:   # every process started before anything is timed: a starting process would slow the pack alone
            [results.get(timeout=WAIT_S) for _ in workers]
        except queue.Empty:
            raise RuntimeError(f"the {SHARED_PACKS} pack processes did not start within {WAIT_S} s") from None
        return _units("shared", sizes.archs, deadline, device, echo, stop_on_error=True, measure=lambda arch: _shared_row(
            arch, cells, device, sizes, commands, results, deadline, echo))
    finally:
        for _ in workers:
            commands.put(None)
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
                worker.join()


def _shared_row(arch: str, cells: int, device: str, sizes: ReportSizes, commands: Any, results: Any, deadline: float,
                echo: Callable[[str], None]) -> dict[str, Any]:
    import queue

    alone = _timed_pack(arch, cells, sizes.shared_steps, sizes.pack_batch, device)
    if device == "cuda":
        torch.cuda.empty_cache()   # this process's cached blocks: the packs find the device as a grid's trials do
    for _ in range(SHARED_PACKS):
        commands.put((arch, cells, sizes.shared_steps, sizes.pack_batch))
    wait = max(0.0, deadline - time.perf_counter()) + WAIT_S
    try:
        packs = [results.get(timeout=wait) for _ in range(SHARED_PACKS)]
    except queue.Empty:
        raise RuntimeError(f"the {SHARED_PACKS} pack processes did not all report within {wait:.0f} s") from None
    errors = [p["error"] for p in packs if "error" in p]
    if errors:
        raise RuntimeError(f"a pack process failed: {errors[0]}")
    began, ended = min(p["began"] for p in packs), max(p["ended"] for p in packs)
    together = sum(p["samples"] for p in packs) / (ended - began)
    alone_rate = alone["samples"] / (alone["ended"] - alone["began"])
    memory = {key: [p[key] for p in packs] for key in packs[0] if key.startswith("peak_")}
    row = {"arch": arch, "packs": SHARED_PACKS, "cells_per_pack": cells, "steps": sizes.shared_steps,
           "batch_size": sizes.pack_batch, "alone_samples_per_s": alone_rate, "together_samples_per_s": together,
           "together_vs_alone": together / alone_rate,
           "per_pack_samples_per_s": [p["samples"] / (p["ended"] - p["began"]) for p in packs],
           # the share of the whole window in which all four packs were training at once
           "overlap": max(0.0, min(p["ended"] for p in packs) - max(p["began"] for p in packs)) / (ended - began),
           **memory, "device_used_mib": max((p["device_used_mib"] for p in packs if p["device_used_mib"] is not None), default=None),
           "device_total_mib": packs[0]["device_total_mib"]}
    peak = (f"peak {max(memory['peak_allocated_mib']):,.0f} MiB allocated a process, device {row['device_used_mib']:,.0f} "
            f"of {row['device_total_mib']:,.0f} MiB in use" if device == "cuda"
            else f"peak RSS {max(memory['peak_rss_mib']):,.0f} MiB a process")
    echo(f"shared  {arch:<12} {SHARED_PACKS} packs of {cells}: {together:,.0f} samples/s together, {alone_rate:,.0f} alone "
         f"({row['together_vs_alone']:.2f}×, overlap {row['overlap']:.0%}), {peak}")
    return row


def _shared_worker(device: str, threads: int, barrier: Any, commands: Any, results: Any) -> None:
    """One of the SHARED_PACKS processes: for each command, a batched pack timed in step with the others."""
    import threading

    torch.set_num_threads(threads)
    results.put({"started": True})
    while (command := commands.get()) is not None:
        try:
            row = _timed_pack(*command, device, ready=lambda: barrier.wait(WAIT_S))
            # Every process is alive and holds its memory until the barrier below: the device's use is all four's.
            row |= _device_memory(device)
            barrier.wait(WAIT_S)
        except (Exception, threading.BrokenBarrierError) as exc:
            barrier.abort()   # the others stop waiting for this one
            row = {"error": f"{type(exc).__name__}: {exc}"}
        results.put(row)
        if device == "cuda":
            torch.cuda.empty_cache()


def _timed_pack(arch: str, cells: int, steps: int, batch: int, device: str,
                ready: Callable[[], None] | None = None) -> dict[str, Any]:
    """A batched pack of `cells` cells, `steps` steps of `batch` on synthetic digits, timed after a one-step warm-up
    (kernel selection, the allocator's first blocks): its window (time.perf_counter, one clock for every process on
    Linux), samples and peak memory. `ready` is called just before the timed run."""
    from xfer import vectorised

    dev = torch.device(device)
    vectorised.train_many(*vectorised.synthetic_pack(arch, cells, 1, batch), device=dev)
    specs, splits, cell_models = vectorised.synthetic_pack(arch, cells, steps, batch)
    _reset_peak(device)
    if ready is not None:
        ready()
    began = time.perf_counter()
    vectorised.train_many(specs, splits, cell_models, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {"began": began, "ended": time.perf_counter(), "samples": cells * steps * batch, **_peak_memory(device)}


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(device: str) -> dict[str, float | None]:
    """Peak memory since `_reset_peak`: the caching allocator's on CUDA (tensors, and the blocks it holds); on a CPU
    only the process's peak RSS, which is the whole process's life, not one part's."""
    if device == "cuda":
        return {"peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}   # KiB on Linux


def _device_memory(device: str) -> dict[str, float | None]:
    """The whole device's memory in use (every process's, CUDA contexts included) and its size; None on a CPU."""
    if device != "cuda":
        return {"device_used_mib": None, "device_total_mib": None}
    free, total = torch.cuda.mem_get_info()
    return {"device_used_mib": (total - free) / 2**20, "device_total_mib": total / 2**20}


# -- the attack stage: generating adversarial sets, and scoring them ----------------------------------------------

def _attack_names() -> tuple[str, ...]:
    """The seed grid's attacks, and the feature attack its surrogates of another label set run instead."""
    from xfer import attack_sets

    from xfer import grid as grids

    return (*grids.Grid().attacks, attack_sets.FEATURE_ATTACK)


def _attack_row(arch: str, name: str, device: str, sizes: ReportSizes, echo: Callable[[str], None]) -> dict[str, Any]:
    """Adversarial examples generated per second on an untrained `arch` (attack.generate, the stage's own call), after a
    warm-up; an example-step is one forward and backward pass of one example."""
    from xfer import attack, stacked
    from xfer.specs import AttackSpec

    n, steps = sizes.attack_n, 1 if name == "fgsm" else sizes.attack_steps
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    model = stacked.untrained(arch, 0)
    spec = AttackSpec(attack=name, eps=0.3, steps=steps, n=n, dataset="mnist")
    attack.generate(model, images[:32], labels[:32], spec, device)   # warm-up: kernel selection, allocator
    began = time.perf_counter()
    attack.generate(model, images, labels, spec, device)   # returns on the CPU: the copy back waits for the device
    seconds = time.perf_counter() - began
    row = {"arch": arch, "attack": name, "examples": n, "steps": steps, "seconds": seconds,
           "examples_per_s": n / seconds, "example_steps_per_s": n * steps / seconds}
    echo(f"attack  {arch:<12} {name:<12} {n} examples × {steps} steps: {row['examples_per_s']:,.0f} examples/s "
         f"({row['example_steps_per_s']:,.0f} example-steps/s)")
    return row


def _score_row(arch: str, device: str, sizes: ReportSizes, echo: Callable[[str], None]) -> dict[str, Any]:
    """Target-examples scored per second, one target after another and stacked (stacked.bench); `best_per_s` is the
    faster, which the attack stage's scoring picks."""
    from xfer import stacked

    [row] = stacked.bench([arch], sizes.score_targets, sizes.score_n, [device], echo)
    rates = [r for r in (row["loop_per_s"], row["stacked_per_s"]) if math.isfinite(r)]
    return {**row, "best_per_s": max(rates)}


# -- the projection: the seed grid on one such device, training and the attack stage --------------------------------

@functools.cache
def _seed_grid() -> tuple[Any, Any, dict[str, data.Info]]:
    """The seed grid, its cells and its datasets' published facts (no files read, as `--dry-run` plans before the data
    is there)."""
    from xfer import grid as grids

    grid = grids.from_preset("seed")
    infos = {name: data.Info(name, p.train, p.test, p.in_shape, p.num_classes, "published", p.class_names)
             for name, p in data.PUBLISHED.items() if name in {*grid.sources, grid.target}}
    return grid, grids.cells(grid, {name: info.train for name, info in infos.items()}), infos


def _projection(done: dict[str, dict[str, Any]], echo: Callable[[str], None]) -> dict[str, Any]:
    """Hours of the seed grid's work on one device like this one, at the rates the sections above measured: training
    (each pack at its arch's batched rate at that pack size; and with four packs sharing the device, at the measured
    together/alone ratio), the estimate stage's forward passes, and the attack stage — every adversarial set generated
    (attack_n examples × its attack's steps) and scored on its targets. Work only: no trial start-up or MLflow records.
    Beside it, the same work in the plan's FLOP model (plan.GPU_TFLOPS), the figure `--dry-run --gpus 1` is built on."""
    from xfer import packs, training_cells
    from xfer import plan as plans

    rates = {
        "train": _rates(done, "batched", lambda r: (r["arch"], r["n_cells"]), "vectorised_samples_per_s"),
        "generate": _rates(done, "attack", lambda r: (r["arch"], r["attack"]), "example_steps_per_s"),
        "score": _rates(done, "score", lambda r: r["arch"], "best_per_s"),
        "forward": _rates(done, "score", lambda r: r["arch"], "loop_per_s"),
    }
    missing = [what for what, measured in rates.items() if not measured]
    if missing:
        raise RuntimeError(f"nothing to project from: no {', '.join(missing)} rates were measured (see the sections above)")
    shared = _rates(done, "shared", lambda r: r["arch"], "together_vs_alone")
    assumed: set[str] = set()

    def rate(kind: str, key: Any) -> float:
        """The measured rate; else the same arch's at the nearest pack size, else the slowest measured (named)."""
        measured = rates[kind]
        if key in measured:
            return measured[key]
        if kind == "train" and any(arch == key[0] for arch, _ in measured):
            nearest = min((k for k in measured if k[0] == key[0]), key=lambda k: abs(k[1] - key[1]))
            assumed.add(f"{kind} {key}: measured at {nearest}")
            return measured[nearest]
        assumed.add(f"{kind} {key}: the slowest measured")
        return min(measured.values())

    grid, cells, infos = _seed_grid()
    flops = (lambda arch, dataset: plans.flops_per_example(arch, infos[dataset].in_shape, infos[dataset].num_classes))
    seconds = dict.fromkeys(("training", "estimate", "attack_generation", "attack_scoring"), 0.0)
    work = dict.fromkeys(seconds, 0.0)   # forward FLOPs × 3 for a trained example, × 1 for a scored one
    by_arch: dict[str, float] = {}
    pack_sizes: dict[str, dict[int, int]] = {}
    for stage, group in (("pretrain", cells.pretrain), ("finetune", cells.finetune), ("scratch", cells.scratch)):
        for pack in packs.plan(list(group), lambda spec: packs.pack_key(training_cells.TRAINING, spec), packs.PACK_SIZE["cuda"]):
            pack_sizes.setdefault(stage, {}).setdefault(len(pack), 0)
            pack_sizes[stage][len(pack)] += 1
            for spec in pack:
                t = spec.train
                examples = _trained_examples(t, infos[t.dataset])
                cell_s = examples / rate("train", (t.arch, len(pack)))
                seconds["training"] += cell_s
                by_arch[t.arch] = by_arch.get(t.arch, 0.0) + cell_s
                work["training"] += 3 * flops(t.arch, t.dataset) * examples
    for e in cells.estimates:
        n, arch = e.n or infos[e.target].train, e.pretrain.train.arch
        seconds["estimate"] += n / rate("forward", arch)
        work["estimate"] += flops(arch, e.target) * n
    sets = _attack_sets(grid, cells, infos)
    n = grid.attack_n
    for (arch, name), count in sets.items():
        steps = 1 if name == "fgsm" else grid.attack_steps
        seconds["attack_generation"] += count * n * steps / rate("generate", (arch, name))
        work["attack_generation"] += count * 3 * n * steps * flops(arch, grid.target)
    pairs = _scored_pairs(grid, cells, sum(sets.values()))
    for arch, count in pairs.items():
        seconds["attack_scoring"] += count * n / rate("score", arch)
        work["attack_scoring"] += count * n * flops(arch, grid.target)
    hours = {what: s / 3600 for what, s in seconds.items()}
    total = sum(hours.values())
    result: dict[str, Any] = {
        "grid": "seed", "device": done.get("install", {}).get("device_name"),
        "cells": {"pretrain": len(cells.pretrain), "finetune": len(cells.finetune), "scratch": len(cells.scratch),
                  "estimate": len(cells.estimates), "attack_sets": sum(sets.values()), "scored_pairs": sum(pairs.values())},
        "attack_sets": {f"{arch}/{name}": count for (arch, name), count in sorted(sets.items())},
        "training_packs": pack_sizes, "hours": hours, "total_hours": total,
        "attack_share": (hours["attack_generation"] + hours["attack_scoring"]) / total,
        "flop_model_hours": {what: w / (plans.GPU_TFLOPS * 1e12) / 3600 for what, w in work.items()},
        "plan_gpu_tflops": plans.GPU_TFLOPS, "assumed": sorted(assumed),
    }
    result["flop_model_total_hours"] = sum(result["flop_model_hours"].values())
    if shared:   # four packs on the device at once, each arch's training at its measured together/alone ratio
        mean = sum(shared.values()) / len(shared)
        training = sum(s / shared.get(arch, mean) for arch, s in by_arch.items()) / 3600
        result["training_hours_four_packs"] = training
        result["total_hours_four_packs"] = total - hours["training"] + training
        assumed.update(f"shared {arch}: the mean together/alone ratio" for arch in by_arch if arch not in shared)
        result["assumed"] = sorted(assumed)
    echo(f"projection: the seed grid ({len(cells.pretrain) + len(cells.finetune) + len(cells.scratch)} training cells, "
         f"{sum(sets.values())} adversarial sets, {sum(pairs.values())} scored pairs) on one {result['device']}: training "
         f"{hours['training']:.2f} h" + (f" ({result['training_hours_four_packs']:.2f} h with four packs sharing it)" if shared else "")
         + f", estimate {hours['estimate']:.2f} h, attack generation {hours['attack_generation']:.2f} h, scoring "
         f"{hours['attack_scoring']:.2f} h: {total:.2f} h, {result['attack_share']:.0%} in attacks (the plan's FLOP model "
         f"at {plans.GPU_TFLOPS:.0f} TFLOP/s: {result['flop_model_total_hours']:.2f} h)"
         + (f"; assumed: {'; '.join(result['assumed'])}" if assumed else ""))
    return result


def _rates(done: dict[str, dict[str, Any]], section: str, key: Callable[[dict[str, Any]], Any], field: str) -> dict[Any, float]:
    """A section's measured rates by `key`, from its rows that did not fail."""
    rows = done.get(section, {}).get("rows", [])
    return {key(row): row[field] for row in rows if "error" not in row and row.get(field)}


def _trained_examples(t: TrainSpec, info: data.Info) -> float:
    """A training cell's work in trained examples, as the plan counts it: its steps × batch, and its evaluations
    (validation and test after every epoch) at plan.EVAL_COST of a trained example."""
    from xfer import plan as plans

    pool = t.size or (info.train - t.val_size)
    batch = min(t.batch_size, pool)
    per_epoch = t.epoch_steps if t.epoch_steps is not None else max(1, pool // batch)
    evaluated = t.epochs * (min(t.val_size, info.train) + info.test)
    return per_epoch * batch * t.epochs + plans.EVAL_COST * evaluated


def _attack_sets(grid: Any, cells: Any, infos: dict[str, data.Info]) -> dict[tuple[str, str], int]:
    """The attack stage's adversarial sets by surrogate arch and attack: plan.attack_sets' count, split by the attack
    each set runs (the label-set rule, attack_sets._attack_for: a pretrained surrogate of another label set runs feature_pgd
    once for the L∞ settings) — FGSM's one step and PGD's ten cost ten times apart."""
    from xfer import attack_sets
    from xfer import plan as plans

    task = infos[grid.target].class_names
    surrogates = [(c.train.arch, infos[c.train.dataset].class_names) for c in cells.pretrain if "pretrain" in grid.attack_surrogates]
    surrogates += [(c.train.arch, task) for c in cells.scratch] if "scratch" in grid.attack_surrogates else []
    surrogates += [(c.train.arch, task) for c in cells.finetune] if "self" in grid.attack_surrogates else []
    made: dict[tuple[str, str], int] = {}
    for arch, classes in surrogates:
        chosen = {attack_sets._attack_for(spec, [plans._Surrogate(classes)], task) for spec in cells.attacks} - {None}
        for spec in chosen:
            made[(arch, spec.attack)] = made.get((arch, spec.attack), 0) + 1
    counted = sum(sets for _, sets in plans.attack_sets(grid, cells, infos)[0])
    if sum(made.values()) != counted:
        raise RuntimeError(f"{sum(made.values())} adversarial sets counted here, {counted} by plan.attack_sets")
    return made


def _scored_pairs(grid: Any, cells: Any, sets: int) -> dict[str, int]:
    """(set, target) pairs scored per target arch, as the plan counts them: pretrained and scratch surrogates' sets on
    every target, each fine-tuned target's own sets on itself, and one clean pass per target."""
    settings = len(cells.attacks)
    targets = [c.train.arch for c in (*cells.finetune, *cells.scratch)]
    own = [c.train.arch for c in cells.finetune] if "self" in grid.attack_surrogates else []
    crossing = sets - settings * len(own)
    return {arch: crossing * targets.count(arch) + settings * own.count(arch) + targets.count(arch) for arch in set(targets)}


if __name__ == "__main__":   # `python -m xfer.bench ...` is `xfer bench ...`
    import sys

    from xfer.cli import main, run_main

    run_main(lambda: main(["bench", *sys.argv[1:]]))
