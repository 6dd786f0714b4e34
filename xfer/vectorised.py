"""Vectorised packs: N cells of one architecture trained as ONE batched model per optimiser step.

Cell i follows `train.train` step for step (batch order, dropout and augmentation draws, optimiser
maths, curve rows, failures, epoch states), but each step runs every cell at once: `torch.func.vmap`
over `functional_call` of one template module, the cells' tensors stacked along a leading axis. On a
GPU one small model per step leaves the device idle (kernel launches dominate); N models per step is
where the speed is. All but the step itself is train.py's own pieces, called per cell: the epoch's seed
and order, the phase's optimiser and schedule, the loss, the curve rows, report records, epoch states
and results.

Why vmap and not a hand-built wide model (grouped convolutions, block-diagonal linears): vmap runs
each arch's own forward code, so every registered arch, and the next one, is covered and equal to
the sequential loop by construction. A wide model needs a rewrite per arch (the mixer's token-mixing
Conv1d runs across the axis a grouped layout would split per cell), and was no faster where measured
(CPU, forward+backward, 8 cells: 0.7x vmap's speed on lenet5, 1.1x on resnet_mini); vmap's conv rule
is itself a grouped convolution plus layout copies.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from xfer import train as loop
from xfer.checkpoint import TrainState
from xfer.data import Split, Splits
from xfer.errors import XferError
from xfer.models import XferModel
from xfer.specs import TrainSpec
from xfer.train import Report, Result

SHARED_FIELDS = (
    "arch", "dataset", "size", "val_size", "epochs", "batch_size", "optimizer", "schedule",
    "unfreeze_epoch", "augment", "label_smoothing", "log_every", "fast_dev_run", "epoch_steps", "precision",
)
"""TrainSpec fields all cells of a pack share: they fix the batched model, the step count, the data
lengths and the step's code path. Everything else (lr, weight_decay, momentum, head_lr_mult,
freeze_depth, unfreeze_lr_mult, seed, the initial weights) is per cell."""

MAX_CELL_PARAMETERS = 5_000_000
"""Packs are for small models whose single steps leave a GPU idle: alexnet_mini, the largest seed arch,
has 3.9M parameters; resnet18 (11M) keeps a device busy alone, so stacking it buys no speed."""

_SLOTS = 3  # per cell, what a parameter tensor belongs to: 0 frozen, 1 and 2 torch.optim param groups 0 and 1
_RANDOM_MODULES = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU)


# ---- what can be vectorised ----------------------------------------------------------------------

def vectorisable(specs: Sequence[TrainSpec], models: Sequence[XferModel]) -> str | None:
    """None if these cells can train as one batched model; else the reason, in words (shown to users)."""
    if not specs:
        return "there are no cells to train"
    if len(specs) != len(models):
        return f"{len(specs)} specs came with {len(models)} models"
    for name in SHARED_FIELDS:
        values = {getattr(spec, name) for spec in specs}
        if len(values) > 1:
            shown = ", ".join(sorted(map(repr, values)))
            return f"the cells differ in {name} ({shown}), which every cell of a batched model must share"
    if loop.dist_world()[1] > 1:
        return "data-parallel training (torch.distributed) shards each cell over processes; a pack runs in one"
    return _model_mismatch(models)


def _model_mismatch(models: Sequence[XferModel]) -> str | None:
    first = models[0]

    def facts(m: XferModel) -> str:
        return f"{m.arch} {tuple(m.in_shape)} -> {m.num_classes} classes, arch options {m.arch_kwargs!r}"

    def tensors(m: XferModel) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(k, tuple(v.shape), v.dtype) for k, v in m.state_dict().items()]

    for other in models[1:]:
        if facts(other) != facts(first):
            return f"the cells' models differ ({facts(first)} vs {facts(other)})"
        if tensors(other) != tensors(first):
            return "the cells' models have differently shaped tensors although they share an arch"
    if any(p.dtype != torch.float32 for p in first.parameters()):
        return "the models' parameters are not float32, the training loop's precision"
    size = sum(p.numel() for p in first.parameters())
    if size > MAX_CELL_PARAMETERS:
        return (f"{first.arch} has {size:,} parameters per cell; packs are for models under {MAX_CELL_PARAMETERS:,} "
                "whose single steps leave the device idle, and a model this size keeps it busy alone")
    random = sorted({type(m).__name__ for m in first.modules() if isinstance(m, _RANDOM_MODULES)})
    if random:
        return f"{first.arch} uses {', '.join(random)}, whose random draws cannot be reproduced per cell"
    return None


# ---- training ------------------------------------------------------------------------------------

@dataclass
class _Cell:
    """Cell i's host-side state: what train.py keeps in local variables, one set per cell."""

    spec: TrainSpec
    model: XferModel
    report: Report
    on_epoch_end: Callable[[TrainState], None] | None
    phase: loop.Phase                    # the torch.optim optimiser and scheduler train.py would use
    curve: list[dict[str, Any]]
    seconds_before: float
    result: Result | None = None         # set when the cell fails
    errors: dict[str, float] | None = None  # val/test errors after the last epoch trained here

    @property
    def live(self) -> bool:
        return self.result is None


def train_many(
    specs: Sequence[TrainSpec],
    data: Sequence[Splits],
    models: Sequence[XferModel],
    reports: Sequence[Report] | None = None,
    device: torch.device | str | None = None,
    resumes: Sequence[TrainState | None] | None = None,
    on_epoch_end: Sequence[Callable[[TrainState], None] | None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[Result]:
    """Train cell i exactly as train.train(specs[i], data[i], models[i], reports[i], device, resumes[i],
    on_epoch_end[i], stop) would, all cells in each step together.

    `models[i]` ends holding cell i's final weights (BatchNorm statistics included); a failed cell's model
    holds its weights at the failing step, as train.train leaves it.
    """
    n = len(specs)
    reason = vectorisable(specs, models)
    if reason is not None:
        raise XferError(f"these {n} cells cannot train as one batched model: {reason}. "
                        "Train them one at a time with xfer.train.train.")
    device = torch.device(device) if device is not None else loop.default_device()
    resumes = list(resumes) if resumes is not None else [None] * n
    start_epoch, step = _resume_position(resumes)
    store = _Store.build([loop.evaluation_splits(s, d) for s, d in zip(specs, data)], device)
    spec = specs[0]
    steps_per_epoch = loop.steps_per_epoch(store.lengths["train"], spec)
    reports = list(reports) if reports is not None else [loop.noop] * n
    callbacks = list(on_epoch_end) if on_epoch_end is not None else [None] * n
    cells = [_start_cell(specs[i], models[i], reports[i], callbacks[i], resumes[i], device, start_epoch, steps_per_epoch)
             for i in range(n)]
    pack = _stack(models, device, min(spec.batch_size, store.lengths["train"]), loop.bf16(spec.precision, device))
    optim = _bind(pack, cells)
    _load_optimiser_states(pack, optim, cells)
    start = time.perf_counter()
    for epoch in range(start_epoch, spec.epochs):
        if spec.unfreeze_epoch is not None and epoch == spec.unfreeze_epoch:
            for cell in cells:
                if cell.live:
                    cell.phase = _phase(cell.spec, cell.model, epoch, steps_per_epoch)
            optim = _bind(pack, cells)
        step = _train_epoch(pack, optim, cells, store, epoch, step, steps_per_epoch, start, stop)
        if not any(cell.live for cell in cells):
            break
        _end_epoch(pack, optim, cells, store, epoch, step, start)
    if any(cell.live and cell.errors is None for cell in cells):  # resumed after its last epoch: evaluate once
        errors = {split: _errors(pack, store, split) for split in ("val", "test")}
        for i, cell in enumerate(cells):
            cell.errors = {split: errors[split][i] for split in errors}
    return [_finish(pack, i, cell, step, start) for i, cell in enumerate(cells)]


def _resume_position(resumes: Sequence[TrainState | None]) -> tuple[int, int]:
    """(epoch, step) every cell starts from; a pack moves all its cells in step, so they must agree."""
    positions = {(r.epoch, r.step) if r is not None else (0, 0) for r in resumes}
    if len(positions) > 1:
        shown = ", ".join(f"epoch {e} (step {s})" for e, s in sorted(positions))
        raise XferError(f"the cells resume from different points ({shown}); a vectorised pack moves all cells in "
                        "step, so resume these cells one at a time with xfer.train.train, or from one epoch.")
    return positions.pop()


def _start_cell(spec: TrainSpec, model: XferModel, report: Report, on_epoch_end: Any,
                resume: TrainState | None, device: torch.device, start_epoch: int, steps_per_epoch: int) -> _Cell:
    """The model on the device and the optimiser and scheduler train.py would build, resumed as it would."""
    model.to(device)
    phase = _phase(spec, model, start_epoch, steps_per_epoch)
    if resume is not None:
        loop.restore(model, phase, resume)
    curve = list(resume.curve) if resume is not None else []
    return _Cell(spec, model, report, on_epoch_end, phase, curve, resume.seconds if resume is not None else 0.0)


def _phase(spec: TrainSpec, model: XferModel, epoch: int, steps_per_epoch: int) -> loop.Phase:
    """train.py's optimiser and scheduler for this phase: the pack reads their learning rates and writes
    their states, so both follow torch.optim exactly; the optimiser itself never sees a gradient."""
    phase = loop.Phase.build(spec, model, start_epoch=epoch, steps_per_epoch=steps_per_epoch)
    for param in model.parameters():
        param.grad = None
    phase.optimizer.step()  # an empty step: tells the scheduler it is stepped after its optimiser, as in train.py
    return phase


def _train_epoch(pack: _Pack, optim: _Optimiser, cells: list[_Cell], store: _Store, epoch: int, step: int,
                 steps_per_epoch: int, start: float, stop: Callable[[], bool] | None = None) -> int:
    """One epoch of every cell, one batched step at a time; returns the step count after it."""
    spec, n, device = cells[0].spec, len(cells), store.images.device
    size = store.lengths["train"]
    seeds = [loop.epoch_seed(cell.spec, epoch) for cell in cells]
    batch = min(spec.batch_size, size)
    orders = torch.stack([loop.epoch_order(size, cell.spec, epoch, steps_per_epoch * batch) for cell in cells])
    orders = orders.to(device) + store.starts["train"][:, None]  # one upload per epoch; batches are slices
    length = max(size, steps_per_epoch * batch)   # the epoch's draws, as train.py counts them: one pass, or epoch_steps
    draws = _Draws.build(seeds, device)
    coefficients = _coefficients(cells, optim, steps_per_epoch, device)
    correct = torch.zeros(n, device=device)
    loss_sum = torch.zeros(n, device=device)
    seen = 0
    for t, begin in enumerate(range(0, steps_per_epoch * batch, batch)):
        if stop is not None and stop():
            for i, cell in enumerate(cells):
                if cell.live:
                    _write_back(pack, i, cell.model)
                    cell.result = loop.stopped(cell.spec, step, epoch, cell.curve, _now(cell, start))
            return step
        idx = orders[:, begin:begin + batch]
        x = loop.as_float(store.images[idx], channels_last=False)  # N×B×C×H×W; the data stays uint8 on the device
        if spec.augment:
            x = draws.augment(x)
        y = store.labels[idx]
        loss, right = _step(pack, optim, coefficients, t, x, y, draws, spec.label_smoothing)
        step += 1
        # Accumulate on the device; read back (one sync for all cells) only every `log_every` steps.
        correct += right
        loss_sum += loss * batch
        seen += batch
        if step % spec.log_every == 0:
            _log_train(pack, cells, loss_sum, correct, seen, step, epoch, epoch + (begin + batch) / length, start)
            correct.zero_()
            loss_sum.zero_()
            seen = 0
    if seen:
        for i, total in enumerate(loss_sum.tolist()):
            if cells[i].live and not math.isfinite(total):
                _fail(pack, i, cells[i], step, epoch, start)
        if epoch == spec.epochs - 1:
            # As train.py: the steps since the last full `log_every` window end the curve with a train error.
            _log_train(pack, cells, loss_sum, correct, seen, step, epoch, epoch + 1, start)
    return step


def _log_train(pack: _Pack, cells: list[_Cell], loss_sum: torch.Tensor, correct: torch.Tensor, seen: int,
               step: int, epoch: int, position: float, start: float) -> None:
    losses, rights = torch.stack([loss_sum, correct]).tolist()
    for i, cell in enumerate(cells):
        if not cell.live:
            continue
        mean_loss = losses[i] / seen
        if not math.isfinite(mean_loss):
            _fail(pack, i, cell, step, epoch, start)
            continue
        row = loop.curve_row(step, position, _now(cell, start), "train", 1 - rights[i] / seen)
        cell.curve.append(row)
        cell.report(loop.train_record(row, mean_loss))


def _fail(pack: _Pack, i: int, cell: _Cell, step: int, epoch: int, start: float) -> None:
    # The cell's model keeps its weights at the failing step, as train.py returns with it; its slot in the pack
    # goes on computing (cells never mix) and its optimiser coefficients are zero from the next epoch.
    _write_back(pack, i, cell.model)
    cell.result = loop.failed(cell.spec, step, epoch, cell.curve, _now(cell, start))


def _end_epoch(pack: _Pack, optim: _Optimiser, cells: list[_Cell], store: _Store, epoch: int, step: int,
               start: float) -> None:
    errors = {split: _errors(pack, store, split) for split in ("val", "test")}
    for i, cell in enumerate(cells):
        if not cell.live:
            continue
        cell.errors = {split: errors[split][i] for split in errors}
        cell.phase.after_evaluation(cell.errors["val"])
        for split, err in cell.errors.items():
            cell.curve.append(loop.curve_row(step, epoch + 1, _now(cell, start), split, err))
        cell.report(loop.epoch_record(step, epoch + 1, _now(cell, start), cell.errors))
        if cell.on_epoch_end is not None:
            _write_back(pack, i, cell.model)
            cell.on_epoch_end(loop.snapshot(epoch + 1, step, _now(cell, start), cell.model,
                                            _optimiser_state(pack, optim, i, cell), cell.phase.scheduler, cell.curve))


def _finish(pack: _Pack, i: int, cell: _Cell, step: int, start: float) -> Result:
    if not cell.live:
        return cell.result
    _write_back(pack, i, cell.model)
    # Evaluation is deterministic, so the last epoch's errors are the final ones (as in train.py).
    return loop.finished(cell.spec, step, cell.errors, cell.curve, _now(cell, start))


def _now(cell: _Cell, start: float) -> float:
    return cell.seconds_before + time.perf_counter() - start


# ---- the data: every distinct split once on the device -------------------------------------------

@dataclass(frozen=True, eq=False)
class _Store:
    """One copy of every distinct split of the pack on the device; cell i's split starts at `starts[split][i]`."""

    images: torch.Tensor                 # uint8 M×C×H×W (4x smaller than float; batches are converted on the fly)
    labels: torch.Tensor                 # int64 M
    starts: dict[str, torch.Tensor]      # "train" | "val" | "test" -> int64 N, on the device
    lengths: dict[str, int]

    @staticmethod
    def build(data: Sequence[Splits], device: torch.device) -> _Store:
        unique: list[Split] = []
        offsets: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for splits in data:
            for split_name, offs in offsets.items():
                split = getattr(splits, split_name)
                found = next((j for j, u in enumerate(unique) if _same(u, split)), None)
                if found is None:
                    unique.append(split)
                    found = len(unique) - 1
                offs.append(sum(len(u) for u in unique[:found]))
        lengths = {}
        for split_name in offsets:
            sizes = {len(getattr(splits, split_name)) for splits in data}
            if len(sizes) > 1:
                raise XferError(f"the cells' {split_name} splits differ in length ({sorted(sizes)}); a pack needs "
                                "one size, so build every cell's data with the same size and val_size.")
            lengths[split_name] = sizes.pop()
        return _Store(
            torch.cat([u.images for u in unique]).to(device), torch.cat([u.labels for u in unique]).to(device),
            {k: torch.tensor(v, device=device) for k, v in offsets.items()}, lengths,
        )


def _same(a: Split, b: Split) -> bool:
    # Cells with one seed get equal but distinct subsets; labels first keeps the image comparison rare.
    return a is b or a.images is b.images or (
        a.images.shape == b.images.shape and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    )


# ---- the batched model ---------------------------------------------------------------------------

class _MaskedDropout(nn.Module):
    """nn.Dropout whose mask is handed in per step (a buffer, so vmap gives each cell its own)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.register_buffer("mask", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.dropout's CPU arithmetic: input * (bernoulli(1-p) / (1-p)); p 0 and 1 draw nothing.
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        return x * self.mask.to(x.dtype)


@dataclass(frozen=True)
class _DropoutSite:
    buffer: str                          # "<module path>.mask", passed to functional_call with the parameters
    p: float
    shape: tuple[int, ...]               # one cell's mask: the module's input at the training batch size


@dataclass
class _Pack:
    """Every cell's tensors stacked on the device, and one template module that runs any of them."""

    template: nn.Module                  # models[0]'s structure on the meta device: code, never tensors
    offsets: dict[str, int]              # where each parameter's N×shape block starts in `flat`
    flat: torch.Tensor                   # all cells' parameters, one block per tensor (so the optimiser is ~8 kernels)
    grad: torch.Tensor                   # their gradients, same layout; backward accumulates into it in place
    params: dict[str, torch.Tensor]      # leaf N×shape views of `flat`, whose .grad are views of `grad`
    buffers: dict[str, torch.Tensor]     # N×shape: input mean/std, BatchNorm statistics (updated in place)
    dropouts: tuple[_DropoutSite, ...]   # in forward call order, the order a cell's generator is drawn in
    n_cells: int
    low: bool = False                    # bf16, as train.py's autocast: the template casts as autocast would

    def block(self, flat: torch.Tensor, name: str, cell: int) -> torch.Tensor:
        """Cell `cell`'s tensor `name` in a buffer laid out like `flat`."""
        shape = self.params[name].shape[1:]
        begin = self.offsets[name] + cell * shape.numel()
        return flat[begin:begin + shape.numel()].view(shape)


@torch.no_grad()
def _stack(models: Sequence[XferModel], device: torch.device, batch: int, low: bool = False) -> _Pack:
    n = len(models)
    named = [dict(m.named_parameters()) for m in models]
    param_names = list(named[0])
    blocks = [torch.stack([params[k].detach() for params in named]).to(device) for k in param_names]
    offsets, total = {}, 0
    for k, block in zip(param_names, blocks):
        offsets[k], total = total, total + block.numel()
    flat = torch.cat([b.reshape(-1) for b in blocks])
    grad = torch.zeros_like(flat)
    params = {}
    for k, block in zip(param_names, blocks):
        view = flat[offsets[k]:offsets[k] + block.numel()].view(block.shape)
        view.grad = grad[offsets[k]:offsets[k] + block.numel()].view(block.shape)
        params[k] = view
    buffer_sets = [dict(m.named_buffers()) for m in models]
    buffers = {k: torch.stack([b[k] for b in buffer_sets]).to(device) for k in buffer_sets[0]}
    template, dropouts = _template(models[0], batch, device.type if low else None)
    return _Pack(template, offsets, flat, grad, params, buffers, dropouts, n, low)


def _template(model: XferModel, batch: int, bf16_on: str | None = None) -> tuple[nn.Module, tuple[_DropoutSite, ...]]:
    """A meta-device copy with nn.Dropout swapped for `_MaskedDropout`, and where its dropouts are called; with
    `bf16_on` (a device type), its layers swapped for ones that cast as bf16 autocast does there (`_AUTOCAST`)."""
    template = copy.deepcopy(model).to("meta")
    if bf16_on is not None:
        swaps = _AUTOCAST[bf16_on if bf16_on in _AUTOCAST else "cpu"]
        for module in template.modules():
            if type(module) in swaps:
                module.__class__ = swaps[type(module)]
    for name, module in list(template.named_modules()):
        if type(module) is nn.Dropout:
            parent, _, child = name.rpartition(".")
            setattr(template.get_submodule(parent), child, _MaskedDropout(module.p))
    sites: list[_DropoutSite] = []
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: sites.append(_DropoutSite(f"{name}.mask", m.p, tuple(args[0].shape))))
        for name, module in template.named_modules() if isinstance(module, _MaskedDropout) and 0 < module.p < 1
    ]
    template.eval()  # shapes only: meta tensors carry no values
    with torch.no_grad():
        template(torch.empty((batch, *model.in_shape), device="meta"))
    for hook in hooks:
        hook.remove()
    return template, tuple(sites)


# ---- bf16 under vmap ----------------------------------------------------------------------------------
# torch.autocast does not reach ops inside torch.func.vmap: there a Linear or a convolution returns float32 where the
# same model alone, under autocast, returns bf16 (checked on CPU, torch 2.9), so a batched pack would train at
# another precision than its cells alone. These layers do what autocast does to them, explicitly: matmuls and
# convolutions in bf16 (inputs, weights and bias cast, output bf16); normalisations compute in float32 and return
# what autocast returns on that device (BatchNorm: its input's dtype; LayerNorm: bf16 on a CPU, float32 on CUDA,
# whose autocast lists layer_norm among its float32 ops). Every other op keeps its input's dtype, with or without
# autocast. tests/test_vectorised.py checks each arch's layer-by-layer dtypes and outputs against autocast's.

def _low(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.to(torch.bfloat16)


class _Bf16Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_low(x), _low(self.weight), _low(self.bias))


class _Bf16Conv1d(nn.Conv1d):
    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(_low(x), _low(weight), _low(bias))


class _Bf16Conv2d(nn.Conv2d):
    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(_low(x), _low(weight), _low(bias))


class _Fp32BatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class _Fp32LayerNorm(nn.LayerNorm):   # CUDA: float32 out
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float())


class _Bf16LayerNorm(nn.LayerNorm):   # CPU: in float32, out as its input
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


_LOW_PRECISION = {nn.Linear: _Bf16Linear, nn.Conv1d: _Bf16Conv1d, nn.Conv2d: _Bf16Conv2d,
                  nn.BatchNorm2d: _Fp32BatchNorm2d}
_AUTOCAST = {"cpu": {**_LOW_PRECISION, nn.LayerNorm: _Bf16LayerNorm},
             "cuda": {**_LOW_PRECISION, nn.LayerNorm: _Fp32LayerNorm}}


def _cell_loss(template: nn.Module, label_smoothing: float, params: dict[str, torch.Tensor],
               buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One cell's loss and correct predictions, as train.train_step computes them; vmap runs it for every cell."""
    logits = functional_call(template, (params, buffers), (x,))
    return loop.cross_entropy(logits, y, label_smoothing), (logits.argmax(1) == y).sum()


def _cell_wrong(template: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (functional_call(template, (params, buffers), (x,)).argmax(1) != y).sum()


def _step(pack: _Pack, optim: _Optimiser, coefficients: _Coefficients, t: int, x: torch.Tensor, y: torch.Tensor,
          draws: _Draws, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step of every cell; returns the cells' losses and correct counts (on the device)."""
    masks = draws.masks(pack)
    pack.template.train()
    pack.grad.zero_()
    # bf16 where train.py autocasts, by the template's own casts (autocast does not reach inside vmap);
    # channels_last is not applied: vmap's conv rule picks the layout.
    loss, right = vmap(lambda p, b, xi, yi: _cell_loss(pack.template, label_smoothing, p, b, xi, yi))(
        pack.params, {**pack.buffers, **masks}, x, y)
    # Cells never mix, so the gradient of the sum is each cell's own gradient in its own block.
    loss.sum().backward()
    _update(pack, optim, coefficients, t)
    return loss.detach(), right


@dataclass(frozen=True)
class _Draws:
    """Where one epoch's random draws of a pack come from: dropout masks and augmentation.

    On a CPU, each cell's own generator, seeded as train.py seeds the cell alone, drawn cell by cell: a batched cell
    draws exactly the bits it would alone (tests/test_vectorised.py checks it). On CUDA, F.dropout's fused kernel
    draws other bits than `bernoulli_` anyway, so there is no alone-equal stream to keep: one generator for the pack,
    each site's masks and each step's crops and flips drawn for all cells in one call (one kernel where a cell-by-cell
    loop launched N). Its seed is the cells' seeds with the epoch, so the same pack draws the same on a rerun or resume.
    """

    generators: tuple[torch.Generator, ...]   # one per cell, or one for the pack

    @staticmethod
    def build(seeds: Sequence[int], device: torch.device, together: bool | None = None) -> _Draws:
        """Per cell on a CPU, one for the pack on CUDA (`together` overrides the choice)."""
        if not (device.type == "cuda" if together is None else together):
            return _Draws(tuple(torch.Generator(device).manual_seed(s) for s in seeds))
        mixed = 0
        for s in seeds:   # an order-dependent mix of every cell's epoch seed, kept in 63 bits
            mixed = (mixed * 1_000_003 + s + 1) % (2**63 - 1)
        return _Draws((torch.Generator(device).manual_seed(mixed),))

    @property
    def together(self) -> bool:
        return len(self.generators) == 1

    def masks(self, pack: _Pack) -> dict[str, torch.Tensor]:
        """Each dropout site's N×shape mask, already scaled by 1 / (1 - p) as F.dropout scales."""
        masks = {}
        for site in pack.dropouts:
            mask = torch.empty((pack.n_cells, *site.shape), device=pack.flat.device)
            if self.together and pack.n_cells > 1:
                mask.bernoulli_(1 - site.p, generator=self.generators[0])
            else:
                for cell, generator in enumerate(self.generators):
                    # On CPU the bits F.dropout draws from the global generator train.py seeds: same cell, same mask.
                    mask[cell].bernoulli_(1 - site.p, generator=generator)
            masks[site.buffer] = mask.div_(1 - site.p)
        return masks

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """N×B×C×H×W images, each cropped and flipped (loop.augment_batch) from its cell's draws or the pack's."""
        if self.together:
            return loop.augment_batch(x.flatten(0, 1), generator=self.generators[0]).view(x.shape)
        return torch.stack([loop.augment_batch(x[i], generator=g) for i, g in enumerate(self.generators)])


EVAL_IMAGES_CUDA = 16_384
"""Images per batched forward when a pack evaluates on CUDA, over all its cells: a 10,000-image test set is then a few
forwards an epoch for a 32-cell pack, not ~157 of 64 images a cell. The seed archs' largest activation at this many
28×28 images is ~1.6 GB (alexnet_mini's first convolution, the mixers' token MLP; float32, no gradient kept), so
four packs sharing a 24 GB GPU still fit. On a CPU, train.py's
EVAL_BATCH: larger chunks only fall out of cache."""


def _eval_images(device: torch.device) -> int:
    return EVAL_IMAGES_CUDA if device.type == "cuda" else loop.EVAL_BATCH


@torch.no_grad()
def _errors(pack: _Pack, store: _Store, split: str) -> list[float]:
    """Every cell's classification error on its own `split`, as train.error computes it."""
    size = store.lengths[split]
    if size == 0:
        return [math.nan] * pack.n_cells
    device = store.images.device
    pack.template.eval()
    wrong = torch.zeros(pack.n_cells, device=device)
    chunk = max(64, _eval_images(device) // pack.n_cells)
    for begin in range(0, size, chunk):
        idx = store.starts[split][:, None] + torch.arange(begin, min(begin + chunk, size), device=device)
        x = loop.as_float(store.images[idx], channels_last=False)
        wrong += vmap(lambda p, b, xi, yi: _cell_wrong(pack.template, p, b, xi, yi))(
            pack.params, pack.buffers, x, store.labels[idx])
    return [w / size for w in wrong.tolist()]


@torch.no_grad()
def _write_back(pack: _Pack, cell: int, model: XferModel) -> None:
    for name, param in model.named_parameters():
        param.copy_(pack.params[name][cell])
    for name, buffer in model.named_buffers():
        buffer.copy_(pack.buffers[name][cell])


# ---- the optimiser: torch.optim's formulas with per-cell coefficients ----------------------------

@dataclass
class _Optimiser:
    """AdamW / Adam / SGD state for every cell in flat buffers laid out like `_Pack.flat`.

    What differs between cells and tensors (learning rate, weight decay, momentum, frozen or not) is kept per (cell,
    slot) and per block of `flat` (one tensor of one cell), and broadcast over the block's elements only while a step
    runs: 2 × 8 bytes per block, where a per-element slot index and per-element weight decay and momentum cost 16
    bytes per parameter element (~2 GB for a 32-cell alexnet_mini pack)."""

    kind: str                            # "adamw" | "adam" | "sgd"
    slots: torch.Tensor                  # int64, per block of `flat` in its order: cell * _SLOTS + (0 frozen | 1 + group)
    lengths: torch.Tensor                # int64, per block: its elements
    state: dict[str, torch.Tensor]       # torch.optim's names: exp_avg, exp_avg_sq | momentum_buffer
    weight_decay: torch.Tensor | float   # per (cell, slot), float32 (Adam's and SGD's L2 term; AdamW's is in the
    momentum: torch.Tensor | float       # coefficients); SGD's momentum per (cell, slot); a float where all agree
    betas: tuple[float, float]
    eps: float
    step: int = 0                        # steps of this phase: Adam's bias correction, SGD's first step

    def per_element(self, table: torch.Tensor | float) -> torch.Tensor | float:
        """A per-(cell, slot) value broadcast over every element of `flat` (a transient tensor); a float stays one."""
        if isinstance(table, float):
            return table
        return table[self.slots].repeat_interleave(self.lengths, output_size=self.state_numel)

    @property
    def state_numel(self) -> int:
        return next(iter(self.state.values())).numel()


@dataclass(frozen=True)
class _Coefficients:
    """One epoch's per-step optimiser scalars per (cell, slot), computed in float64 on the host as torch.optim does."""

    scale: torch.Tensor                  # steps × N·_SLOTS: -lr (SGD) or -lr / bias_correction1 (Adam, AdamW)
    decay: torch.Tensor                  # steps × N·_SLOTS: 1 - lr·weight_decay (AdamW)
    bias_correction2_sqrt: list[float]


def _bind(pack: _Pack, cells: list[_Cell]) -> _Optimiser:
    """Fresh optimiser state for the cells' current phases: which slot each tensor of each cell is in."""
    names_in_order = list(pack.offsets)
    slots = [[0] * len(names_in_order) for _ in cells]
    hyper = [[(0.0, 0.0)] * _SLOTS for _ in cells]  # (weight_decay, momentum) per slot; frozen slots have none
    for i, cell in enumerate(cells):
        if not cell.live:
            continue
        name_of = {id(p): k for k, p in cell.model.named_parameters()}
        for g, group in enumerate(cell.phase.optimizer.param_groups):
            hyper[i][g + 1] = (group["weight_decay"], group.get("momentum", 0.0))
            for param in group["params"]:
                slots[i][names_in_order.index(name_of[id(param)])] = g + 1
    device = pack.flat.device
    for j, name in enumerate(names_in_order):
        # Backward skips a tensor that no cell trains (and everything only it needs).
        pack.params[name].requires_grad_(any(slots[i][j] for i in range(len(cells))))
    # `flat` holds each tensor's N cells one after another: block (j, i) is tensor j of cell i.
    block_slots = torch.tensor([i * _SLOTS + slots[i][j] for j in range(len(names_in_order)) for i in range(len(cells))],
                               device=device)
    lengths = torch.tensor([pack.params[name][0].numel() for name in names_in_order for _ in cells], device=device)
    used = {(i, slots[i][j]) for i, cell in enumerate(cells) if cell.live for j in range(len(names_in_order)) if slots[i][j]}

    def table(column: int) -> torch.Tensor | float:
        """Per (cell, slot), or one float where every slot a live cell trains agrees (a frozen slot's value never
        reaches a weight: its step scale is 0, and unfreezing binds fresh state)."""
        values = {hyper[i][g][column] for i, g in used}
        if len(values) <= 1:
            return float(values.pop()) if values else 0.0
        return torch.tensor([h[column] for cell_hyper in hyper for h in cell_hyper], dtype=torch.float64).float().to(device)

    first = cells[0].phase.optimizer.param_groups[0]
    kind = cells[0].spec.optimizer
    keys = ("momentum_buffer",) if kind == "sgd" else ("exp_avg", "exp_avg_sq")
    return _Optimiser(kind, block_slots, lengths, {k: torch.zeros_like(pack.flat) for k in keys}, table(0), table(1),
                      tuple(first.get("betas", (0.9, 0.999))), first.get("eps", 1e-8))


def _coefficients(cells: list[_Cell], optim: _Optimiser, steps: int, device: torch.device) -> _Coefficients:
    """Step each cell's own torch.optim scheduler through the epoch and record its learning rates."""
    beta1, beta2 = optim.betas
    scale = [[0.0] * (len(cells) * _SLOTS) for _ in range(steps)]
    decay = [[1.0] * (len(cells) * _SLOTS) for _ in range(steps)]
    for t in range(steps):
        bias_correction1 = 1 - beta1 ** (optim.step + t + 1)
        for i, cell in enumerate(cells):
            if not cell.live:
                continue
            for g, group in enumerate(cell.phase.optimizer.param_groups):
                lr, slot = group["lr"], i * _SLOTS + g + 1
                scale[t][slot] = -lr if optim.kind == "sgd" else -(lr / bias_correction1)
                decay[t][slot] = 1 - lr * group["weight_decay"] if optim.kind == "adamw" else 1.0
            cell.phase.after_step()
    return _Coefficients(
        torch.tensor(scale, dtype=torch.float64).float().to(device),
        torch.tensor(decay, dtype=torch.float64).float().to(device),
        [(1 - beta2 ** (optim.step + t + 1)) ** 0.5 for t in range(steps)],
    )


def _l2(grad: torch.Tensor, weight_decay: torch.Tensor | float, param: torch.Tensor) -> torch.Tensor:
    """torch.optim's L2 term, grad + weight_decay · param (a new tensor; the same one where there is none)."""
    if isinstance(weight_decay, float):
        return grad if weight_decay == 0 else grad.add(param, alpha=weight_decay)
    return torch.addcmul(grad, weight_decay, param)


@torch.no_grad()
def _update(pack: _Pack, optim: _Optimiser, coefficients: _Coefficients, t: int) -> None:
    """torch.optim's single-tensor step, all cells and tensors at once; a frozen slot's coefficients are 0."""
    param = pack.flat
    scale = optim.per_element(coefficients.scale[t])
    # AdamW decays the weights by its coefficients below; Adam and SGD add the L2 term to the gradient.
    grad = pack.grad if optim.kind == "adamw" else _l2(pack.grad, optim.per_element(optim.weight_decay), param)
    if optim.kind == "sgd":
        buf = optim.state["momentum_buffer"]
        if optim.step == 0:
            buf.copy_(grad)  # torch.optim.SGD starts its buffer as a copy of the first gradient
        else:
            buf.mul_(optim.per_element(optim.momentum)).add_(grad)
        param.addcmul_(buf, scale)
    else:
        beta1, beta2 = optim.betas
        exp_avg, exp_avg_sq = optim.state["exp_avg"], optim.state["exp_avg_sq"]
        if optim.kind == "adamw":
            param.mul_(optim.per_element(coefficients.decay[t]))
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / coefficients.bias_correction2_sqrt[t]).add_(optim.eps)
        param.addcdiv_(scale * exp_avg, denom)
    optim.step += 1


def _optimiser_state(pack: _Pack, optim: _Optimiser, i: int, cell: _Cell) -> dict[str, Any]:
    """Cell i's optimiser state exactly as torch.optim writes it for train.py's param groups."""
    optimizer = cell.phase.optimizer
    name_of = {id(p): k for k, p in cell.model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            blocks = {k: pack.block(v, name_of[id(param)], i).clone() for k, v in optim.state.items()}
            if optim.kind != "sgd":
                optimizer.state[param] = {"step": torch.tensor(float(optim.step)), **blocks}
            elif group["momentum"] != 0 and optim.step > 0:
                optimizer.state[param] = blocks
    state = optimizer.state_dict()  # fresh clones above, and packed copies of the groups: a snapshot
    optimizer.state.clear()
    return state


@torch.no_grad()
def _load_optimiser_states(pack: _Pack, optim: _Optimiser, cells: list[_Cell]) -> None:
    """Copy each cell's resumed torch.optim state (loaded into its real optimiser) into the flat buffers."""
    steps = set()
    for i, cell in enumerate(cells):
        optimizer = cell.phase.optimizer
        name_of = {id(p): k for k, p in cell.model.named_parameters()}
        for param, slots in optimizer.state.items():
            for key, flat in optim.state.items():
                if key in slots:
                    pack.block(flat, name_of[id(param)], i).copy_(slots[key])
            steps.add(int(slots["step"]) if "step" in slots else 1)  # SGD keeps no step: any buffer means "not first"
        optimizer.state.clear()
    if len(steps) > 1:
        raise XferError(f"the cells' optimiser states are at different steps ({sorted(steps)}); resume them one at a "
                        "time with xfer.train.train.")
    optim.step = steps.pop() if steps else 0


# ---- choosing the path, and the benchmark --------------------------------------------------------

@dataclass(frozen=True)
class PackTiming:
    """Wall-clock of `steps` optimiser steps of every cell of a pack: one by one (train.train) and batched."""

    steps: int
    samples: int                         # training examples seen by all cells together, each way
    sequential_s: float
    vectorised_s: float

    @property
    def speedup(self) -> float:
        return self.sequential_s / self.vectorised_s

    @property
    def vectorised_is_faster(self) -> bool:
        return self.vectorised_s < self.sequential_s


def measure(specs: Sequence[TrainSpec], data: Sequence[Splits], models: Sequence[XferModel],
            device: torch.device | str | None = None, steps: int = 10, repeats: int = 1) -> PackTiming:
    """Time `steps` steps of these cells both ways, after one warm-up step each way; with `repeats`, the best of
    that many timings each way (another process's burst slows one timing, never speeds one up).

    Runs the real paths (train.train per cell, then train_many) on copies of the models and on each cell's
    data cut to `steps` batches without validation or test splits, so it costs about 2·steps·N·repeats single
    steps. The pack runner calls it where the batched model is not always faster (CPU) and prints the choice.
    """
    device = torch.device(device) if device is not None else loop.default_device()
    batch = min(specs[0].batch_size, len(data[0].train))
    # fast_dev_run off: it would cut every cell to one step, and `steps` steps are what is timed.
    timed = [dataclasses.replace(s, epochs=1, unfreeze_epoch=None, fast_dev_run=False) for s in specs]

    def cut(d: Splits, k: int) -> Splits:
        empty = d.train.subset(torch.arange(0))
        return Splits(d.train.subset(torch.arange(min(len(d.train), k * batch))), empty, empty, d.class_names)

    def run(k: int) -> tuple[float, float]:
        cut_data = [cut(d, k) for d in data]
        copies = [copy.deepcopy(m) for m in models]
        _sync(device)
        begin = time.perf_counter()
        for s, d, m in zip(timed, cut_data, copies):
            loop.train(s, d, m, device=device)
        _sync(device)
        middle = time.perf_counter()
        train_many(timed, cut_data, [copy.deepcopy(m) for m in models], device=device)
        _sync(device)
        return middle - begin, time.perf_counter() - middle

    run(1)
    timings = [run(steps) for _ in range(max(1, repeats))]
    sequential, vectorised = min(t[0] for t in timings), min(t[1] for t in timings)
    done = min(steps, len(data[0].train) // batch)
    return PackTiming(done, done * batch * len(specs), sequential, vectorised)


def bench_pack(arch: str, n_cells: int, device: torch.device | str | None, steps: int, batch_size: int) -> dict[str, Any]:
    """Samples/s and cells/hour of `n_cells` cells of `arch` trained one by one vs batched, on synthetic
    1×28×28 10-class data (the seed's shape). A "cell" here is `steps` steps of `batch_size`; the cells
    differ in lr, head_lr_mult and seed (so in batch order), as a grid's pack does."""
    device = torch.device(device) if device is not None else loop.default_device()
    specs, data, cells = synthetic_pack(arch, n_cells, steps, batch_size)
    timing = measure(specs, data, cells, device, steps)
    return {
        "arch": arch, "n_cells": n_cells, "device": str(device), "steps": timing.steps, "batch_size": batch_size,
        "sequential_samples_per_s": timing.samples / timing.sequential_s,
        "vectorised_samples_per_s": timing.samples / timing.vectorised_s,
        "sequential_cells_per_hour": n_cells * 3600 / timing.sequential_s,
        "vectorised_cells_per_hour": n_cells * 3600 / timing.vectorised_s,
        "speedup": timing.speedup, **optimiser_memory(cells[0], n_cells, specs[0].optimizer),
    }


def synthetic_pack(arch: str, n_cells: int, steps: int, batch_size: int) -> tuple[list[TrainSpec], list[Splits],
                                                                                 list[XferModel]]:
    """A benchmark's pack: `n_cells` cells of `arch` differing in lr, head lr and seed (so in batch order), as a
    grid's pack does, each `steps` batches of the same random 1×28×28 10-class digits (the seed's shape)."""
    generator = torch.Generator().manual_seed(0)
    size = steps * batch_size
    train = Split(torch.randint(0, 256, (size, 1, 28, 28), dtype=torch.uint8, generator=generator),
                  torch.randint(0, 10, (size,), generator=generator))
    empty = train.subset(torch.arange(0))
    data = Splits(train, empty, empty, tuple(str(c) for c in range(10)))
    specs = [TrainSpec(arch=arch, dataset="synthetic", size=size, val_size=0, epochs=1, batch_size=batch_size,
                       lr=1e-3 * (1 + cell), head_lr_mult=1 + cell % 2, seed=cell) for cell in range(n_cells)]
    return specs, [data] * n_cells, [loop.prepare_model(spec, data) for spec in specs]


def optimiser_memory(model: XferModel, n_cells: int, optimizer: str) -> dict[str, float]:
    """MiB the batched optimiser keeps between steps for a pack of `n_cells` cells of `model`: its state buffers
    (SGD's momentum, or Adam's two moments, as big as the pack's parameters) and per-block tables, against the
    per-element layout it replaced (an int64 slot index, weight decay and momentum for every parameter element)."""
    elements = n_cells * sum(p.numel() for p in model.parameters())
    blocks = n_cells * sum(1 for _ in model.parameters())
    state = elements * 4 * (1 if optimizer == "sgd" else 2)
    return {"optimiser_mib": (state + blocks * 16) / 2**20, "optimiser_mib_per_element_layout": (state + elements * 16) / 2**20}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
