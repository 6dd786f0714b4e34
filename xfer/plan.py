"""What a grid will do and what it will cost, before anything runs: cells, packs and an estimate per stage.

`plan` needs neither the data (a torchvision set whose files are absent is planned from its published sizes
and named as missing) nor Ray. Its estimate comes from measured throughput: `throughput` times a few
training steps of each arch on this machine's CPU at the grid's batch size (kept in
``<runs>/calibration.json``, so it is measured once), or on a GPU when one is here. For GPUs that are not
here, the estimate is each arch's FLOPs per example over an assumed effective rate (`GPU_TFLOPS`), said so
in the output. Per-cell and per-pack overheads are measured figures too (see the constants).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from xfer import calibration, grid as grids
from xfer import names
from xfer.specs import TrainSpec

# Fixed costs, measured 2026-12-06 on the 2-core development machine with the seed grid's --fast-dev-run (README,
# Results): a pack's trial start (a reused worker: the dataset from the object store, Tune's bookkeeping) and a
# cell's MLflow records (six requests, its checkpoint and curve written to the runs folder). The fine-tune stage's
# 1,320 cells in 165 packs cost 0.22 s of a slot each beyond their own work, pack starts included.
PACK_START_S = 1.0
CELL_RECORD_S = 0.2
STAGE_START_S = 8.0            # a stage's Tune run: its set-up and its ends
REPORT_S = 5.0                 # reading the runs, drawing the figures, logging the report run
EVAL_COST = 1 / 3              # an evaluated example costs about a third of a trained one (forward only)
GPU_TFLOPS = 30.0              # assumed effective TFLOP/s of one GPU on these small models (issue 15's figure for an H100)
CALIBRATION_STEPS = 3          # timed training steps per arch (after one warm-up step)


@dataclass
class StagePlan:
    stage: str
    cells: int
    finished: int
    todo: int
    packs: int
    seconds_here: float            # on this machine's CPUs (or its GPU)
    seconds_gpus: float            # on G GPUs not here (FLOP model), or measured when the GPU is here
    note: str = ""
    at_most: bool = False          # `cells` and `todo` are upper bounds (what the run makes cannot be told yet)
    skipped: bool = False          # not among the invocation's stages (--stages): left out of the totals

    def counted(self, value: int) -> str:
        return f"≤{value}" if self.at_most else str(value)


@dataclass
class Plan:
    stages: list[StagePlan]
    missing: dict[str, str]
    sources: list[str] = field(default_factory=list)   # where the throughput figures come from, in words
    slots: int = 1
    gpus: int = 0

    def lines(self) -> list[str]:
        head = f"  {'stage':<9} {'cells':>6} {'in MLflow':>9} {'to run':>7} {'packs':>6}  {'here':>12}"
        head += f"  {f'on {self.gpus} GPU(s)':>14}" if self.gpus else ""
        out = [head]
        for s in self.stages:
            if s.skipped:
                row = f"  {s.stage:<9} {s.counted(s.cells):>6} {s.finished:>9} {'skipped':>7} {'—':>6}  {'—':>12}"
                row += f"  {'—':>14}" if self.gpus else ""
                out.append(row + "  (not in --stages)")
                continue
            row = (f"  {s.stage:<9} {s.counted(s.cells):>6} {s.finished:>9} {s.counted(s.todo):>7} {s.packs:>6}  "
                   f"{duration(s.seconds_here):>12}")
            row += f"  {duration(s.seconds_gpus):>14}" if self.gpus else ""
            out.append(row + (f"  ({s.note})" if s.note else ""))
        run = [s for s in self.stages if not s.skipped]
        bound = "≤" if any(s.at_most for s in run) else ""
        total = (f"  {'total':<9} {bound + str(sum(s.cells for s in run)):>6} {'':>9} "
                 f"{bound + str(sum(s.todo for s in run)):>7} {sum(s.packs for s in run):>6}  "
                 f"{duration(sum(s.seconds_here for s in run)):>12}")
        total += f"  {duration(sum(s.seconds_gpus for s in run)):>14}" if self.gpus else ""
        out.append(total)
        out += [f"  costs: {source}" for source in self.sources]
        if self.missing:
            first, what = next(iter(self.missing.items()))
            out.append(f"  warning: the data of {', '.join(self.missing)} is missing; planned from the published sizes. "
                       f"The run needs the files (--download with network, or torchvision's files under --data-root); "
                       f"{first}, for one, needs {what}.")
        return out


def duration(seconds: float) -> str:
    if seconds <= 0:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---- throughput ------------------------------------------------------------------------------------

def throughput(arch: str, in_shape: tuple[int, int, int], classes: int, batch: int, device: str = "cpu",
               threads: int = 1, cache: Path | None = None) -> tuple[float, str]:
    """Training examples per second of `arch` at `batch` on `device` with `threads` CPU threads, and where the
    figure comes from ("measured now" or the date it was measured, from `cache`)."""
    key = f"throughput/{device}/{arch}/{'x'.join(map(str, in_shape))}/batch{batch}/threads{threads}"
    known = calibration.read(cache)
    if key in known:
        return known[key]["samples_per_s"], f"measured {known[key]['measured']}"
    rate = _measure(arch, in_shape, classes, batch, device, threads)
    if cache is not None:
        calibration.remember(cache, key, {"samples_per_s": rate, "measured": time.strftime("%Y-%m-%d %H:%M")})
    return rate, "measured now"


def _measure(arch: str, in_shape: tuple[int, int, int], classes: int, batch: int, device: str, threads: int) -> float:
    """Examples per second of the training loop's own step (`train.train_step`) for a cell of TrainSpec's default
    recipe (AdamW at lr 1e-3, bf16 autocast on CUDA only), on one random float batch stepped again and again: data
    loading, augmentation, the schedule and logging are not timed."""
    import torch

    from xfer import models
    from xfer import train as loop

    recipe = TrainSpec(arch=arch, dataset="calibration")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = models.build(arch, in_shape, classes).to(device)
        # Every parameter in one group: a cell's backbone and head groups differ only in their lr.
        optimizer = loop.build_optimizer(recipe, [{"params": list(model.parameters())}])
        low = loop.bf16(recipe.precision, device)
        x = torch.rand(batch, *in_shape, device=device)
        y = torch.randint(0, classes, (batch,), device=device)
        elapsed = 0.0
        for step in range(CALIBRATION_STEPS + 1):
            began = time.perf_counter()
            loop.train_step(model, optimizer, x, y, recipe.label_smoothing, low)
            if device == "cuda":
                torch.cuda.synchronize()
            if step:   # the first step warms up kernels and the allocator
                elapsed += time.perf_counter() - began
        return CALIBRATION_STEPS * batch / elapsed
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def flops_per_example(arch: str, in_shape: tuple[int, int, int], classes: int) -> float:
    """Forward FLOPs of one example (torch's FlopCounterMode); training costs about three times that."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from xfer import models

    model = models.build(arch, in_shape, classes).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(2, *in_shape))
    return counter.get_total_flops() / 2


@functools.lru_cache(maxsize=None)
def activation_bytes(arch: str, in_shape: tuple[int, int, int], classes: int) -> int:
    """Bytes of float32 activations one training example keeps for its backward pass, counted as every leaf
    module's output in one forward (an in-place ReLU's output is counted though it shares its input's memory, so
    this leans high)."""
    import torch

    from xfer import models

    model = models.build(arch, in_shape, classes)
    total = 0

    def count(_module: Any, _args: Any, out: Any) -> None:
        nonlocal total
        total += sum(t.numel() for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor))

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *in_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return 4 * total


@functools.lru_cache(maxsize=None)
def _parameters(arch: str, in_shape: tuple[int, int, int], classes: int) -> int:
    from xfer import models

    return sum(p.numel() for p in models.build(arch, in_shape, classes).parameters())


ACTIVATION_FACTOR = 1.5
"""What a batched training step keeps beyond its leaf modules' outputs (BatchNorm's normalised input, a residual's
sum, vmap's batched copies). Measured on the 2-core CPU, float32, batch 128, as the growth of the process's peak RSS
from 4 to 16 cells (2026-12-07): per cell 129 MiB for resnet_mini (leaf outputs alone: 85), 54 for mlp_mixer (47),
148 for alexnet_mini (166); 1.5 keeps resnet_mini's right and the others' over, which costs a smaller pack, not an
out-of-memory trial."""


def pack_memory(arch: str, in_shape: tuple[int, int, int], classes: int, cells: int, batch: int,
                optimizer: str = "adamw") -> dict[str, float]:
    """Estimated bytes a batched pack of `cells` cells of `arch` holds while it trains at `batch`: per cell its
    parameters, gradients and optimiser state (SGD's momentum, Adam's two moments: 4 bytes an element each), two
    parameter-sized transients of the batched update and its last epoch's state (`train.snapshot`: parameters and
    optimiser state again, on the device), plus `batch` examples' activations (`activation_bytes` ×
    ACTIVATION_FACTOR) and input. Bytes in float32; bf16 autocast keeps some activations at half that. Not counted:
    the process's own (torch's runtime, ~0.3-0.5 GiB of RSS on a CPU; the CUDA context on a GPU), which
    cluster.MEMORY_HEADROOM leaves room for. xfer bench --gpu-report prints it beside the peak it measures."""
    params = _parameters(arch, in_shape, classes)
    states = 1 if optimizer == "sgd" else 2
    weights = cells * params * 4 * (2 + states + 2 + (1 + states))
    per_example = ACTIVATION_FACTOR * activation_bytes(arch, in_shape, classes) + 4 * math.prod(in_shape)
    activations = cells * batch * per_example
    return {"weights_bytes": float(weights), "activation_bytes": float(activations), "total_bytes": float(weights + activations)}


def fitting_pack(arch: str, in_shape: tuple[int, int, int], classes: int, cells: int, batch: int, optimizer: str,
                 budget: float) -> int:
    """The most cells, at most `cells` and at least one, whose batched pack fits `budget` bytes (`pack_memory`)."""
    per_cell = pack_memory(arch, in_shape, classes, 1, batch, optimizer)["total_bytes"]
    return max(1, min(cells, int(budget // per_cell)))


def _memory_words(todo: Sequence[Any], infos: dict[str, Any], pack: int, where: str) -> str:
    """The largest training pack's estimated memory (`pack_memory`), at `pack` cells a pack: what a node must hold
    per trial."""
    by_arch: dict[tuple[str, str, int, str], int] = {}
    for cell in todo:
        t = cell.train
        key = (t.arch, t.dataset, t.batch_size, t.optimizer)
        by_arch[key] = min(pack, by_arch.get(key, 0) + 1)
    if not by_arch:
        return ""
    estimates = []
    for (arch, dataset, batch, optimizer), cells in by_arch.items():
        info = infos[dataset]
        size = pack_memory(arch, info.in_shape, info.num_classes, cells, min(batch, info.train), optimizer)
        estimates.append((size["total_bytes"], arch, cells, batch, size))
    total, arch, cells, batch, size = max(estimates)
    return (f"memory {where}: the largest training pack, {cells} {arch} cells at batch {batch}, needs about "
            f"{total / 2**30:.2f} GiB ({size['weights_bytes'] / 2**30:.2f} GiB weights, gradients and optimiser state, "
            f"{size['activation_bytes'] / 2**30:.2f} GiB activations; plan.pack_memory) a trial")


# ---- the plan ----------------------------------------------------------------------------------------

def plan(grid: grids.Grid, cells: grids.Cells, infos: dict[str, Any], finished: Callable[[str], set[str]],
         missing: dict[str, str], pack_size: Callable[[bool], int], slots: int, cpus_per_trial: float = 1.0,
         gpus: int = 0, gpu_share: float = 0.25, echo: Callable[[str], None] | None = None,
         attack_cells: Callable[[], tuple[int, int]] | None = None, report_made: bool = False,
         only: Collection[str] = names.GRID_STAGES, notes: dict[str, str] | None = None) -> Plan:
    """Each stage's cells, what MLflow already has (`finished(stage)`: keys), packs and estimated wall time here
    (`slots` trials at once on this machine) and on `gpus` GPUs (`gpu_share` of a GPU per trial).
    `attack_cells()`: the attack stage's (cells, still to run), asked only once the training stages that run have
    nothing left (before then its cells are counted from the grid and its datasets' class names); `report_made`:
    the report of these runs is already made. A stage not in `only` (--stages) is a row marked skipped, with its
    cells and what MLflow has, and left out of the totals; nothing of it is measured. `notes`: a word per stage
    (what --prune-sources leaves out of the fine-tune stage's `cells`)."""
    from xfer import specs

    cache = calibration.path()
    threads = max(1, int(cpus_per_trial))
    rates: dict[tuple[str, tuple[int, int, int]], float] = {}   # by arch and input shape (the head is negligible)
    sources: dict[str, str] = {}

    def seconds(t: TrainSpec, on_gpu: bool) -> float:
        info = infos[t.dataset]
        examples = t.size or (info.train - t.val_size)
        per_epoch = t.epoch_steps if t.epoch_steps is not None else max(1, examples // min(t.batch_size, examples))
        steps = (1 if t.fast_dev_run else per_epoch) * t.epochs
        trained = steps * min(t.batch_size, examples)
        evaluated = t.epochs * (2 * t.batch_size if t.fast_dev_run else min(t.val_size, info.train) + info.test)
        key = (t.arch, info.in_shape)
        if on_gpu:
            work = 3 * flops_per_example(*key, info.num_classes) * (trained + EVAL_COST * evaluated)
            return work / (GPU_TFLOPS * 1e12 * gpu_share) + CELL_RECORD_S
        if key not in rates:
            if echo is not None and not _known(cache, t.arch):
                echo(f"  measuring {t.arch}'s training throughput on this CPU ({CALIBRATION_STEPS} steps)…")
            rates[key], sources[t.arch] = throughput(*key, 10, t.batch_size, "cpu", threads, cache)
        return (trained + EVAL_COST * evaluated) / rates[key] + CELL_RECORD_S

    stages = []
    for stage, group in ((names.PRETRAIN, cells.pretrain), (names.FINETUNE, cells.finetune), (names.SCRATCH, cells.scratch)):
        done = finished(stage)
        todo = [c for c in group if specs.key(c) not in done]
        if stage not in only:
            stages.append(StagePlan(stage, len(group), len(group) - len(todo), len(todo), 0, 0.0, 0.0, skipped=True))
            continue
        here, packs = _packed(todo, pack_size(False), slots, lambda c: seconds(c.train, False))
        on_gpus = _packed(todo, pack_size(True), max(1, int(gpus / gpu_share)), lambda c: seconds(c.train, True))[0] if gpus else 0.0
        stages.append(StagePlan(stage, len(group), len(group) - len(todo), len(todo), packs, here, on_gpus,
                                note=(notes or {}).get(stage, "")))
        if stage == names.PRETRAIN and cells.estimates:
            stages.append(_estimate_plan(cells, infos, finished, slots, gpus, gpu_share, threads, cache,
                                         8 * pack_size(False), skipped=names.ESTIMATE not in only))
    adder_row = _adder_plan(grid, finished, slots, pack_size(False), cpus_per_trial, cache, rates, sources, infos,
                            skipped=names.ADDER not in only)
    if adder_row is not None:
        stages.append(adder_row)
    # What the attack stage attacks is what MLflow holds when it starts: known now if no stage before it has work.
    trained = all(s.todo == 0 for s in stages if not s.skipped)
    stages.append(_attack_plan(grid, cells, infos, slots, gpus, attack_cells() if trained and attack_cells else None,
                               8 * pack_size(False), threads, skipped=names.ATTACK not in only))
    made = report_made and all(s.todo == 0 for s in stages if not s.skipped)
    stages.append(StagePlan(names.REPORT, 1, int(made), int(not made), 0, 0.0 if made else REPORT_S,
                            0.0 if made or not gpus else REPORT_S, skipped=names.REPORT not in only))
    words = []
    training = [c for stage, group in ((names.PRETRAIN, cells.pretrain), (names.FINETUNE, cells.finetune),
                                       (names.SCRATCH, cells.scratch)) if stage in only for c in group]
    memory = [_memory_words(training, infos, pack_size(False), "here")]
    if gpus:
        memory.append(_memory_words(training, infos, pack_size(True), "on a GPU"))
    words += [w for w in memory if w]
    if rates:
        words.append("CPU throughput per arch (training examples/s, " + f"{threads} thread(s) a trial): "
                     + ", ".join(f"{arch} {r:,.0f} ({sources[arch]})" for (arch, _), r in rates.items())
                     + f"; kept in {cache}")
    words.append(f"{slots} trial(s) at once here; a pack's start {PACK_START_S:g} s and a cell's MLflow records "
                 f"{CELL_RECORD_S:g} s (measured on the 2-core development machine)")
    if gpus:
        words.append(f"GPUs are not measured here: their column assumes {GPU_TFLOPS:.0f} TFLOP/s effective per GPU on "
                     f"each arch's FLOPs (torch's FlopCounter), {gpu_share:g} GPU per trial")
    return Plan(stages, missing, words, slots, gpus)


def _packed(todo: list[Any], size: int, slots: int, cost: Callable[[Any], float]) -> tuple[float, int]:
    """Wall time of `todo` in packs of ≤ `size` over `slots` (longest pack first onto the least loaded slot),
    and the number of packs."""
    if not todo:
        return 0.0, 0
    packs = max(min(slots, len(todo)), math.ceil(len(todo) / size))
    per_pack = [0.0] * packs
    for i, cell in enumerate(todo):
        per_pack[i % packs] += cost(cell)
    loads = [0.0] * max(1, slots)
    for work in sorted(per_pack, reverse=True):
        loads[loads.index(min(loads))] += work + PACK_START_S
    return max(loads) + STAGE_START_S, packs


ESTIMATE_LOAD_S = 0.3   # an estimate cell's model download and load, beside its forward pass (CELL_RECORD_S apart)


def _estimate_plan(cells: grids.Cells, infos: dict[str, Any], finished: Callable[[str], set[str]], slots: int,
                   gpus: int, gpu_share: float, threads: int, cache: Path, pack: int, skipped: bool = False) -> StagePlan:
    """The estimate stage: a forward pass of each pretrained model over its `n` target images, at the arch's scoring
    speed on this CPU (`score_rate`; the four estimators themselves take well under a second a model at n=10,000:
    `xfer bench --estimate`), and a model load and an MLflow run per cell."""
    from xfer import specs

    done = finished(names.ESTIMATE)
    todo = [c for c in cells.estimates if specs.key(c) not in done]
    row = StagePlan(names.ESTIMATE, len(cells.estimates), len(cells.estimates) - len(todo), len(todo), 0, 0.0, 0.0,
                    skipped=skipped)
    if skipped or not todo:
        return row
    target = infos[todo[0].target]
    images = (lambda c: c.n or target.train)

    def cost(c: Any, on_gpu: bool) -> float:
        arch = c.pretrain.train.arch
        if on_gpu:
            return images(c) * flops_per_example(arch, target.in_shape, target.num_classes) / (GPU_TFLOPS * 1e12 * gpu_share)
        return images(c) / score_rate(arch, target.in_shape, target.num_classes, threads, cache) + ESTIMATE_LOAD_S + CELL_RECORD_S

    row.seconds_here, row.packs = _packed(todo, pack, slots, lambda c: cost(c, False))
    row.seconds_gpus = _packed(todo, pack, max(1, int(gpus / gpu_share)), lambda c: cost(c, True))[0] if gpus else 0.0
    return row


def _adder_plan(grid: grids.Grid, finished: Callable[[str], set[str]], slots: int, size: int, cpus: float,
                cache: Path, rates: dict[Any, float], sources: dict[str, str], infos: dict[str, Any],
                skipped: bool = False) -> StagePlan | None:
    """The adder stage: its digit classifiers' pretraining and its cells (each step: two digit images per pair)."""
    from xfer import specs

    adder_cells = grids.adder_cells(grid)
    if not adder_cells:
        return None
    done = finished(names.ADDER)
    todo = [c for c in adder_cells if specs.key(c) not in done]
    if skipped:
        return StagePlan(names.ADDER, len(adder_cells), len(adder_cells) - len(todo), len(todo), 0, 0.0, 0.0, skipped=True)
    threads = max(1, int(cpus))
    target = infos[grid.target]

    def rate(arch: str, batch: int) -> float:
        key = (arch, (1, *target.in_shape[1:]))
        if key not in rates:
            rates[key], sources[arch] = throughput(arch, key[1], 10, batch, "cpu", threads, cache)
        return rates[key]

    def cost(cell: Any) -> float:
        steps = max(1, cell.size // min(cell.batch_size, cell.size)) * cell.epochs
        digit = cell.pretrain.train.arch if cell.pretrain is not None else "digit_cnn"
        images = 2 * (steps * min(cell.batch_size, cell.size) + EVAL_COST * cell.epochs * (cell.val_pairs + cell.test_pairs))
        return images / rate(digit, 2 * cell.batch_size) + CELL_RECORD_S

    classifiers = {c.pretrain for c in todo if c.pretrain is not None}
    pretraining = sum(((target.train - c.train.val_size) * c.train.epochs) / rate(c.train.arch, c.train.batch_size)
                      for c in classifiers) / max(1, slots)
    seconds, packs = _packed(todo, size, slots, cost)
    return StagePlan(names.ADDER, len(adder_cells), len(adder_cells) - len(todo), len(todo), packs,
                     seconds + pretraining, 0.0, note=f"and {len(classifiers)} digit classifier(s) to pretrain" if classifiers else "")


def _attack_plan(grid: grids.Grid, cells: grids.Cells, infos: dict[str, Any], slots: int, gpus: int,
                 known: tuple[int, int] | None, pack: int = 1, threads: int = 1, skipped: bool = False) -> StagePlan:
    """The attack stage (`Grid.attack_surrogates`): its adversarial sets — every pretrained and scratch model's, scored
    on every target, and each fine-tuned target's own (white-box), scored on itself — made once each (attack_n
    examples × steps, a forward and backward pass each, at the surrogate's training speed), then scored (a forward
    pass of attack_n per (set, target) pair and one clean pass per target, at each target arch's scoring speed as
    `xfer bench --score` measures it: `score_rate`). `known`: (cells, still to run) from MLflow once training is
    done; before then the count is `attack_sets`' (exact where the datasets' class names are known, else a bound)."""
    made, exact = attack_sets(grid, cells, infos)   # surrogate archs, with the sets each makes
    estimate = sum(sets for _, sets in made)
    count, todo = known or (estimate, estimate)
    at_most = known is None and not exact
    if skipped or not todo or not cells.attacks:
        return StagePlan(names.ATTACK, count, count - todo, 0 if not skipped else todo, 0, 0.0, 0.0, at_most=at_most,
                         skipped=skipped)
    share = min(1.0, todo / max(1, estimate))   # what is left, when part of it is in MLflow
    settings = len(cells.attacks)
    targets = [c.train.arch for c in (*cells.finetune, *cells.scratch)]
    own = [c.train.arch for c in cells.finetune] if "self" in grid.attack_surrogates else []
    crossing = estimate - settings * len(own)   # sets scored on every target: pretrained and scratch surrogates'
    target = infos[grid.target]
    n, steps = grid.attack_n, grid.attack_steps
    cache = calibration.path()
    # Work in CPU seconds (one thread) and in forward FLOPs, per arch.
    cpu = sum(sets * n * steps / throughput(a, target.in_shape, target.num_classes, grid.batch_size, "cpu", threads,
                                            cache)[0] for a, sets in made)
    pairs = {a: crossing * targets.count(a) + settings * own.count(a) + targets.count(a) for a in set(targets)}
    cpu += sum(count_ * n / score_rate(a, target.in_shape, target.num_classes, threads, cache) for a, count_ in pairs.items())
    here = share * (cpu + count * CELL_RECORD_S) / max(1, slots) + STAGE_START_S
    packs = -(-todo // max(1, pack))
    gpu = 0.0
    if gpus:
        archs = {a for a, _ in made}
        flops = {a: flops_per_example(a, target.in_shape, target.num_classes) for a in archs | set(targets)}
        work = sum(sets * 3 * n * steps * flops[a] for a, sets in made) + sum(c * n * flops[a] for a, c in pairs.items())
        gpu = share * work / (GPU_TFLOPS * 1e12 * gpus)
    scored = sum(pairs.values())
    counted = "" if known else ("at most: some datasets' class names are not known before training; " if at_most
                                else "cells counted from the datasets' class names; ")
    return StagePlan(names.ATTACK, count, count - todo, todo, packs, here, gpu, at_most=at_most,
                     note=f"{round(share * scored):,} (set, target) scores in one table; {counted}rough")


class _Surrogate(NamedTuple):
    """What the label-set rule (`attack_sets._attack_for`) reads of a surrogate: the classes its head knows."""

    class_names: tuple[str, ...]


def attack_sets(grid: grids.Grid, cells: grids.Cells, infos: dict[str, Any]) -> tuple[list[tuple[str, int]], bool]:
    """The attack stage's adversarial sets before anything is trained: each surrogate's arch and how many sets it
    makes, and whether every count is exact.

    `attack_sets.plan` makes them from MLflow's runs; here the same label-set rule (`attack_sets._attack_for`) reads the
    datasets' class names (`data.Info.class_names`): a pretrained surrogate whose classes are not the target's runs
    `feature_pgd` for every L∞ setting (so FGSM and PGD at one eps are one set) and none for targeted or L2 ones.
    A dataset whose class names are not known (a datasets.json written before they were kept) counts every setting:
    then the count is an upper bound. Scratch models are trained on the target; each fine-tuned target attacks itself.
    """
    from xfer import attack_sets

    task = tuple(infos[grid.target].class_names)
    settings = len(cells.attacks)
    made: list[tuple[str, int]] = []
    exact = True
    for c in cells.pretrain if "pretrain" in grid.attack_surrogates else ():
        classes = tuple(infos[c.train.dataset].class_names)
        if not (classes and task):
            exact = False
            made.append((c.train.arch, settings))
            continue
        chosen = {a for spec in cells.attacks if (a := attack_sets._attack_for(spec, [_Surrogate(classes)], task)) is not None}
        made.append((c.train.arch, len(chosen)))
    made += [(c.train.arch, settings) for c in cells.scratch] if "scratch" in grid.attack_surrogates else []
    made += [(c.train.arch, settings) for c in cells.finetune] if "self" in grid.attack_surrogates else []
    return made, exact


def score_rate(arch: str, in_shape: tuple[int, int, int], classes: int, threads: int = 1, cache: Path | None = None,
               targets: int = 4, images: int = 256) -> float:
    """Target-examples scored per second on this CPU for `arch`, the faster of one target after another and stacked
    (`xfer.stacked.timed`, as `xfer bench --score` measures it): timed once on untrained models and kept in `cache`."""
    key = f"score/cpu/{arch}/{'x'.join(map(str, in_shape))}/targets{targets}/threads{threads}"
    known = calibration.read(cache)
    if key in known:
        return known[key]["examples_per_s"]
    import torch

    from xfer import models, stacked

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            built = [models.build(arch, in_shape, classes) for _ in range(targets)]
            x = torch.randint(0, 256, (images, *in_shape), dtype=torch.uint8)
        loop_s, stacked_s = stacked.timed(built, "cpu", x)
    finally:
        torch.set_num_threads(before)
    rate = targets * images / min(loop_s, stacked_s if math.isfinite(stacked_s) else loop_s)
    if cache is not None:
        calibration.remember(cache, key, {"examples_per_s": rate, "measured": time.strftime("%Y-%m-%d %H:%M")})
    return rate


def _known(cache: Path, arch: str) -> bool:
    return any(f"/{arch}/" in key for key in calibration.read(cache))


__all__ = ["Plan", "StagePlan", "plan", "attack_sets", "throughput", "score_rate", "flops_per_example", "duration", "GPU_TFLOPS",
           "activation_bytes", "pack_memory", "fitting_pack"]
