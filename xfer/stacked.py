"""Many models of one arch answering the same images: one stacked model (torch.func) or one after another.

The attack stage scores K targets (fine-tuned and scratch models of one arch) on each adversarial set. Stacked,
the targets' tensors lie along a leading axis and `vmap` over `functional_call` of one template runs a batch of
images through all K at once (the images are not batched: in_dims=None, so they are moved and read once). That
is where a GPU's speed is; on a CPU stacking is often slower (vmap's conv rule adds layout copies), so `choose`
measures it once per machine and keeps the answer in the runs folder's calibration.json.

    python -m xfer.bench --score [--archs resnet_mini mlp_mixer] [--targets 8] [--n 1000] [--json]
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from xfer import calibration, models
from xfer.attack import EVAL_BATCH, as_unit
from xfer.errors import XferError

MODES = ("stacked", "loop")
STACKED_MUST_WIN = 1.2       # a few timed batches are noisy: stacking must win clearly, or reruns flip the choice
TIMING_IMAGES = 2 * EVAL_BATCH   # `choose` times at most this many of the images it is handed, each way
WARMUP_IMAGES = 64           # kernel selection and the allocator's first blocks, before anything is timed


# ---- what can be stacked --------------------------------------------------------------------------

def stackable(models: Sequence[nn.Module]) -> str:
    """"" when these models can run as one stacked model; else why not, in words (shown to users)."""
    if not models:
        return "there are no models"
    first = models[0]
    for other in models[1:]:
        if type(other) is not type(first):
            return f"the models are of different classes ({type(first).__name__}, {type(other).__name__})"
        if _facts(other) != _facts(first):
            # Same tensors can still mean another forward (lenet5 is sigmoid at 28×28 and ReLU at 32×32).
            return f"the models differ ({_facts(first)} vs {_facts(other)})"
        mismatch = _layout_mismatch(_layout(first), _layout(other))
        if mismatch:
            return mismatch
    return ""


def _facts(model: nn.Module) -> str:
    """What fixes an xfer model's forward beyond its tensors (nothing, for another module)."""
    if not hasattr(model, "arch"):
        return type(model).__name__
    return f"{model.arch} for {tuple(model.in_shape)} images, arch options {model.arch_kwargs!r}"


def _layout(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    tensors = [("parameter", model.named_parameters()), ("buffer", model.named_buffers())]
    return {f"{kind} {name}": (tuple(t.shape), t.dtype) for kind, named in tensors for name, t in named}


def _layout_mismatch(first: dict[str, Any], other: dict[str, Any]) -> str:
    if first.keys() != other.keys():
        odd = sorted(first.keys() ^ other.keys())
        return f"the models have different tensors ({', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''} in one only)"
    for name, (shape, dtype) in first.items():
        if other[name] != (shape, dtype):
            other_shape, other_dtype = other[name]
            return (f"{name} is {list(shape)} {str(dtype).removeprefix('torch.')} in one model and "
                    f"{list(other_shape)} {str(other_dtype).removeprefix('torch.')} in another")
    return ""


# ---- the stack ------------------------------------------------------------------------------------

class Stack:
    """K models answering the same images: `predict` gives each one's labels as a [K, N] tensor.

    Built once per set of targets, then every adversarial set is streamed through it. The Stack holds its own
    copies, in eval mode, without gradients, on `device`: the caller's models are left as they were. Asked for
    "stacked" with models that cannot be stacked, it goes one after another and `why` says why.
    """

    def __init__(self, models: Sequence[nn.Module], device: torch.device | str, mode: str = "stacked") -> None:
        if mode not in MODES:
            raise XferError(f"scoring mode {mode!r} is not one of {', '.join(MODES)}.")
        if not models:
            raise XferError("there are no target models to score; a Stack needs at least one.")
        self.device = torch.device(device)
        self.why = stackable(models) if mode == "stacked" else ""
        self.mode = "loop" if self.why else mode
        self.targets = len(models)
        self.in_shape = getattr(models[0], "in_shape", None)
        if self.mode == "stacked":
            # torch.func.stack_module_state's stacking, without its demand that the caller's models share a
            # training mode: they are scored in eval mode whatever theirs, and are left as they are.
            self._params = _stacked([dict(m.named_parameters()) for m in models], self.device)
            # BatchNorm's running statistics are buffers: stacked too, so each target normalises with its own.
            self._buffers = _stacked([dict(m.named_buffers()) for m in models], self.device)
            # A template without values: functional_call supplies every tensor, and eval() fixes BatchNorm and
            # Dropout to their scoring behaviour whatever mode the caller's models were in.
            template = copy.deepcopy(models[0]).to("meta").eval()
            self._forward = vmap(lambda p, b, x: functional_call(template, (p, b), (x,)), in_dims=(0, 0, None))
        # Each target alone too (small models: a second copy is cheap): a set only some targets need (a white-box
        # set needs its own model) goes through those alone rather than through all K.
        self._models = [copy.deepcopy(m).to(self.device).eval().requires_grad_(False) for m in models]

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = EVAL_BATCH, which: Sequence[int] | None = None) -> torch.Tensor:
        """Each target's predicted labels (int64, CPU, [K, N]) for uint8 or [0, 1] images, `batch` images per pass;
        float32 on every device, as `attack.predict` scores one target. `which`: only these targets (rows in that
        order); the stacked model runs when they are at least half of them, each alone otherwise."""
        chosen = list(range(self.targets)) if which is None else list(which)
        if batch < 1:
            raise XferError(f"the scoring batch must be at least 1 image, not {batch}.")
        x = as_unit(images)
        if self.in_shape is not None and tuple(x.shape[1:]) != tuple(self.in_shape):
            raise XferError(f"the targets take images of shape {tuple(self.in_shape)} but these are "
                            f"{tuple(x.shape[1:])}; targets and attacked data must share one image shape.")
        together = self.mode == "stacked" and 2 * len(chosen) >= self.targets
        if not chosen:
            return torch.empty((0, len(x)), dtype=torch.long)
        answers = []
        for i in range(0, len(x), batch):
            chunk = x[i:i + batch].to(self.device)   # moved once, read by every target
            if together:
                answers.append(self._forward(self._params, self._buffers, chunk).argmax(2)[chosen].cpu())
            else:
                answers.append(torch.stack([self._models[k](chunk).argmax(1) for k in chosen]).cpu())
        return torch.cat(answers, 1) if answers else torch.empty((len(chosen), 0), dtype=torch.long)


def _stacked(named: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """Each tensor of the models stacked along a new leading (model) axis, on `device`."""
    return {k: torch.stack([tensors[k].detach().to(device) for tensors in named]) for k in named[0]}


# ---- choosing: stacked on a GPU, measured once on a CPU ----------------------------------------------

def choose(models: Sequence[nn.Module], device: torch.device | str, cache: Path | None,
           images_for_timing: torch.Tensor) -> tuple[str, str]:
    """(mode, why) for scoring these models on `device`: "stacked" on CUDA when they can be stacked; elsewhere
    "stacked" only where it measured at least STACKED_MUST_WIN× faster than one after another.

    The measurement (a warm-up, then each mode once over up to TIMING_IMAGES of `images_for_timing`) is kept
    in `cache` (the runs folder's calibration.json) per device, arch, image shape, target count and CPU threads,
    so it is paid once per machine; `cache` None measures every time.
    """
    device = torch.device(device)
    refused = stackable(models)
    if refused:
        return "loop", f"one target after another: {refused}"
    what = f"{len(models)} {_arch(models[0])} targets"
    if device.type == "cuda":
        return "stacked", f"stacked {what} on cuda (one pass of each batch through all of them)"
    shape = "x".join(str(d) for d in images_for_timing.shape[1:])
    key = f"scoring/{device.type}/{_arch(models[0])}/{shape}/targets{len(models)}/threads{torch.get_num_threads()}"
    entry = calibration.read(cache).get(key)
    if not isinstance(entry, dict) or entry.get("mode") not in MODES or "speedup" not in entry:
        entry = _measure(models, device, images_for_timing)
        if cache is not None:
            calibration.remember(cache, key, entry)
    if entry["mode"] == "stacked":
        return "stacked", f"stacked {what} measured {entry['speedup']:.2f}× faster on {device.type}"
    return "loop", (f"one target after another: stacked measured {entry['speedup']:.2f}× on {device.type} "
                    f"(it must reach {STACKED_MUST_WIN:.1f}×)")


def _measure(models: Sequence[nn.Module], device: torch.device, images: torch.Tensor) -> dict[str, Any]:
    if not len(images):
        raise XferError("choosing how to score the targets times them on some images, and none were given.")
    n = min(len(images), TIMING_IMAGES)
    loop_s, stacked_s = timed(models, device, images[:n])
    speedup = loop_s / stacked_s
    return {"mode": "stacked" if speedup >= STACKED_MUST_WIN else "loop", "speedup": speedup, "loop_s": loop_s,
            "stacked_s": stacked_s, "images": n, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}


def timed(models: Sequence[nn.Module], device: torch.device | str, images: torch.Tensor,
          batch: int = EVAL_BATCH) -> tuple[float, float]:
    """Seconds to score `images` on every model one after another, and stacked (NaN if they cannot be), each
    after a warm-up pass."""
    device = torch.device(device)
    stacks = [Stack(models, device, "loop")]
    if not stackable(models):
        stacks.append(Stack(models, device, "stacked"))
    seconds = []
    for stack in stacks:
        stack.predict(images[:WARMUP_IMAGES], batch)
        _sync(device)
        began = time.perf_counter()
        stack.predict(images, batch)   # returns on the CPU: the copy back waits for the device
        seconds.append(time.perf_counter() - began)
    return seconds[0], seconds[1] if len(seconds) > 1 else math.nan


def _arch(model: nn.Module) -> str:
    return getattr(model, "arch", type(model).__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- benchmark ------------------------------------------------------------------------------------

SCORE_ARCHS = ("resnet_mini", "alexnet_mini", "mlp_mixer")


def bench(archs: Sequence[str], targets: int, n: int, devices: Sequence[str],
          echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Target-examples scored per second, one target after another against stacked, per arch and device: `targets`
    untrained models of the arch (seeds 0..targets-1) on `n` random uint8 1×28×28 images, each way after a warm-up."""
    if targets < 1 or n < 1:
        raise XferError(f"--score needs at least one target and one image (got {targets} targets, {n} images).")
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = []
    echo(f"scoring {targets} targets on {n} images, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    echo(f"{'arch':<13} {'device':<6} {'targets':>7} {'loop/s':>10} {'stacked/s':>10} {'ratio':>6}")
    for device in devices:
        for arch in archs:
            built = [untrained(arch, seed) for seed in range(targets)]
            loop_s, stacked_s = timed(built, device, images)
            row = {"arch": arch, "device": str(device), "targets": targets, "examples": n,
                   "loop_per_s": targets * n / loop_s, "stacked_per_s": targets * n / stacked_s,
                   "ratio": loop_s / stacked_s}
            rows.append(row)
            refused = stackable(built)
            echo(f"{arch:<13} {device:<6} {targets:>7} {row['loop_per_s']:>10,.0f} {row['stacked_per_s']:>10,.0f} "
                 f"{row['ratio']:>5.2f}×" + (f"  (not stacked: {refused})" if refused else ""))
    return rows


def untrained(arch: str, seed: int) -> models.XferModel:
    """An untrained `arch` model for 1×28×28 images and 10 classes, its weights drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):   # the caller's random stream is left where it was
        torch.manual_seed(seed)
        return models.build(arch, (1, 28, 28), 10)
