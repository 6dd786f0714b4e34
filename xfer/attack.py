"""Attacks: a registry over torchattacks (`@attack`), and the pure core that makes adversarial examples on a
surrogate and scores them on a target (`generate`, `evaluate`), with no MLflow; an adversarial set on disk
(`save_examples`, `read_examples`). Which sets a grid needs, and making them as MLflow runs, is `xfer.attack_sets`;
scoring them on every target, `xfer.scores`.

`xfer bench --attack` times PGD generation on resnet_mini.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from xfer import names, specs, tracking
from xfer.errors import XferError
from xfer.registry import Registry
from xfer.models import XferModel
from xfer.specs import AttackSpec

if TYPE_CHECKING:
    from torchattacks.attack import Attack

GENERATE_BATCH = 1000   # examples per attack call: bounds activation memory of iterative attacks
EVAL_BATCH = 1000       # examples per forward pass when scoring targets
EXAMPLES_FILE = "examples.safetensors"

Builder = Callable[[nn.Module, AttackSpec], "Attack"]


# ---- the registry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegisteredAttack:
    """A registered attack: how to build it and what it asks of the surrogate."""

    name: str
    build: Builder
    loss: str = "logits"     # "logits": raises the loss on the task's labels; "features": label-free feature distortion
    targeted: bool = True    # has a targeted mode
    linf: bool = True        # bounded by eps in L∞ (CW is an L2 attack and ignores eps)


_ATTACKS: Registry[RegisteredAttack] = Registry("attack", "attacks", "the attack")


def attack(name: str, loss: str = "logits", targeted: bool = True, linf: bool = True) -> Callable[[Builder], Builder]:
    """Register `fn(model, spec) -> Attack` under `name`; `model` takes [0, 1] pixels."""

    def register(fn: Builder) -> Builder:
        _ATTACKS.add(name, RegisteredAttack(name, fn, loss, targeted, linf))
        return fn

    return register


def list_attacks() -> list[str]:
    return _ATTACKS.names()


def registered(name: str) -> RegisteredAttack:
    """The registered attack `name` (its builder and what it supports); an unknown name is refused listing the known."""
    return _ATTACKS.get(name)


def _alpha(spec: AttackSpec, budget_multiple: float) -> float:
    """The step size: the spec's, or `budget_multiple` × eps spread over the steps."""
    return spec.alpha if spec.alpha is not None else budget_multiple * spec.eps / spec.steps


@attack("fgsm")
def _fgsm(model: nn.Module, spec: AttackSpec) -> Attack:
    return _torchattacks().FGSM(model, eps=spec.eps)


@attack("bim")
def _bim(model: nn.Module, spec: AttackSpec) -> Attack:
    # eps/steps: the iterates can just reach the budget's edge, as in Kurakin et al.'s schedule.
    return _torchattacks().BIM(model, eps=spec.eps, alpha=_alpha(spec, 1.0), steps=spec.steps)


@attack("pgd")
def _pgd(model: nn.Module, spec: AttackSpec) -> Attack:
    # 2.5·eps/steps (Madry et al.): from a random start, any point of the eps-ball stays reachable.
    return _torchattacks().PGD(model, eps=spec.eps, alpha=_alpha(spec, 2.5), steps=spec.steps, random_start=True)


@attack("mifgsm")
def _mifgsm(model: nn.Module, spec: AttackSpec) -> Attack:
    # Dong et al.: alpha = eps / T and momentum decay 1.0.
    return _torchattacks().MIFGSM(model, eps=spec.eps, alpha=_alpha(spec, 1.0), steps=spec.steps, decay=1.0)


@attack("difgsm")
def _difgsm(model: nn.Module, spec: AttackSpec) -> Attack:
    # DI²-FGSM (Xie et al.): resize to 90–100% and pad back with probability 0.5; no momentum.
    return _torchattacks().DIFGSM(model, eps=spec.eps, alpha=_alpha(spec, 1.0), steps=spec.steps, decay=0.0,
                               resize_rate=0.9, diversity_prob=0.5)


@attack("cw", linf=False)
def _cw(model: nn.Module, spec: AttackSpec) -> Attack:
    # L2 Carlini–Wagner, c=1 (torchattacks' advice); alpha = Adam's step in tanh space. 0.1, not the paper's 0.01:
    # grids run tens of steps, not thousands, and at 0.01 CW barely moves in 30 steps on MNIST.
    return cw_class()(model, c=1.0, kappa=0.0, steps=spec.steps, lr=spec.alpha if spec.alpha is not None else 0.1)


@attack("feature_pgd", loss="features", targeted=False)
def _feature_pgd(model: nn.Module, spec: AttackSpec) -> Attack:
    return feature_pgd_class()(model, eps=spec.eps, alpha=_alpha(spec, 2.5), steps=spec.steps)


def _torchattacks() -> ModuleType:
    """torchattacks, imported when an attack is first built: its import (scipy.stats among others) takes seconds
    that checking a grid's attack names never needs."""
    import torchattacks

    return torchattacks


@functools.cache
def cw_class() -> type[Attack]:
    """torchattacks' CW with its targeted mode fixed.

    torchattacks 3.3.0 keeps, as the best example so far, one whose prediction differs from the labels it was given;
    in targeted mode those labels are the targets, so it keeps the examples that miss them (measured: 0% of targeted
    CW examples hit their target). 3.4+ fixed that (keep where the prediction is the target) but broke `f`, which
    takes the target's logit as max(one_hot × logits): 0, not the logit, when that logit is negative. This is 3.3.0's
    `f` (`masked_select`) with 3.4's condition; untargeted CW is 3.3.0's, unchanged.
    """
    torchattacks = _torchattacks()

    class CW(torchattacks.CW):
        def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            images = images.clone().detach().to(self.device)
            labels = labels.clone().detach().to(self.device)
            aims = self.get_target_label(images, labels) if self.targeted else labels
            w = self.inverse_tanh_space(images).detach().requires_grad_(True)
            best_adv, best_l2 = images.clone(), torch.full((len(images),), 1e10, device=self.device)
            prev_cost, shape = 1e10, [-1] + [1] * (images.dim() - 1)
            optimizer = torch.optim.Adam([w], lr=self.lr)
            for step in range(self.steps):
                adv = self.tanh_space(w)
                l2 = (adv - images).pow(2).flatten(1).sum(1)
                outputs = self.get_logits(adv)
                cost = l2.sum() + self.c * self.f(outputs, aims).sum()
                optimizer.zero_grad()
                cost.backward()
                optimizer.step()
                predicted = outputs.detach().argmax(1)
                # An example counts when it does what the attack asks (hits its target / leaves its label) with a
                # smaller perturbation than the best so far.
                success = (predicted == aims) if self.targeted else (predicted != labels)
                better = (success & (best_l2 > l2.detach())).float()
                best_l2 = better * l2.detach() + (1 - better) * best_l2
                better = better.view(shape)
                best_adv = better * adv.detach() + (1 - better) * best_adv
                if step % max(self.steps // 10, 1) == 0:   # torchattacks' early stop when the cost rises
                    if cost.item() > prev_cost:
                        return best_adv
                    prev_cost = cost.item()
            return best_adv

    return CW


@functools.cache
def feature_pgd_class() -> type[Attack]:
    """`FeaturePGD`, a torchattacks Attack, defined once torchattacks is imported."""
    from torchattacks.attack import Attack

    class FeaturePGD(Attack):
        """L∞ PGD maximising ‖f(x') − f(x)‖² for a feature extractor f: needs no labels, so any label set will do.

        The feature-level transfer attack of e.g. Inkawhich et al. (2019) and Ganeshan et al.'s FDA, in its
        simplest form: the surrogate's penultimate features, squared L2 distance, torchattacks' call shape.
        """

        def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int) -> None:
            super().__init__("FeaturePGD", model)
            self.eps, self.alpha, self.steps = eps, alpha, steps
            self.supported_mode = ["default"]

        def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
            images = images.clone().detach().to(self.device)
            with torch.no_grad():
                clean = self.get_logits(images)
            # The random start is needed, not a nicety: the squared distance has a zero gradient at x' = x.
            adv = (images + torch.empty_like(images).uniform_(-self.eps, self.eps)).clamp(0, 1)
            for _ in range(self.steps):
                adv.requires_grad_(True)
                cost = (self.get_logits(adv) - clean).pow(2).sum()
                grad = torch.autograd.grad(cost, adv)[0]
                adv = adv.detach() + self.alpha * grad.sign()
                adv = (images + (adv - images).clamp(-self.eps, self.eps)).clamp(0, 1)
            return adv.detach()

    return FeaturePGD


# ---- surrogate wrappers: [0, 1] pixels in, normalisation inside each member ------------------------

class Ensemble(nn.Module):
    """Several models' logits averaged (Liu et al. 2017); each member normalises its own [0, 1] input."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


class Features(nn.Module):
    """The members' penultimate features (body outputs) on [0, 1] pixels, concatenated."""

    def __init__(self, members: Sequence[XferModel]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.body((x - m.mean) / m.std).flatten(1) for m in self.members], 1)


# ---- the pure core --------------------------------------------------------------------------------

def generate(surrogate: nn.Module | Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor,
             spec: AttackSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """Adversarial versions of `images` (uint8, or float in [0, 1]) made on `surrogate`: float in [0, 1], on the CPU.

    A list of models is an ensemble surrogate. Targeted attacks aim at `target_labels(labels, classes, spec.seed)`.
    The same spec gives the same examples (the attack's randomness is seeded by `spec.seed`).
    """
    entry = registered(spec.attack)
    members = list(surrogate) if isinstance(surrogate, (list, tuple)) else [surrogate]
    x = as_unit(images)
    labels = labels.long()
    _check_surrogate(members, x, labels, entry, spec)
    if entry.loss == "features":
        model: nn.Module = Features(members)
    else:
        model = members[0] if len(members) == 1 else Ensemble(members)
    aims = target_labels(labels, _num_classes(members[0]), spec.seed) if spec.targeted else labels
    device = device_of(device)
    with _prepared(model, device), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        atk = entry.build(model, spec)
        atk.set_device(device)
        if spec.targeted:   # the labels handed to the attack are the targets; torchattacks prints the mode change
            with redirect_stdout(io.StringIO()):
                atk.set_mode_targeted_by_function(_the_labels)
        chunks = [atk(x[i:i + GENERATE_BATCH].to(device), aims[i:i + GENERATE_BATCH].to(device)).cpu()
                  for i in range(0, len(x), GENERATE_BATCH)]
    return torch.cat(chunks)


def _the_labels(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A targeted attack's target map: the labels it is given are the targets (`set_mode_targeted_by_label` of
    torchattacks 3.4+, which 3.3.0 lacks; its `None` for this raises)."""
    return labels


def target_labels(labels: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A seeded random wrong label per example, uniform over the other classes."""
    shift = torch.randint(1, num_classes, labels.shape, generator=torch.Generator().manual_seed(seed))
    return (labels.cpu() + shift) % num_classes


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Predicted labels (CPU) for uint8 or [0, 1] images, in eval mode, batched, in float32 on every device: a score
    must not depend on which device computed it (bf16 on a GPU flipped borderline predictions a CPU did not)."""
    device = device_of(device)
    x = as_unit(images)
    with _prepared(model, device):
        preds = []
        for i in range(0, len(x), EVAL_BATCH):
            preds.append(model(x[i:i + EVAL_BATCH].to(device)).argmax(1).cpu())
    return torch.cat(preds)


def evaluate(target: nn.Module, clean: torch.Tensor, adv: torch.Tensor, labels: torch.Tensor,
             device: torch.device | str | None = None, clean_predictions: torch.Tensor | None = None) -> dict[str, float]:
    """Clean accuracy, adversarial accuracy and attack success rate of `target` on one adversarial set.

    Success rate = share of the examples the target classifies correctly when clean that it gets wrong
    after the attack (NaN when it gets none right: there is nothing to attack). `clean_predictions`: the target's
    predictions on `clean` when already known (`AttackContext.clean_predictions`), so only `adv` is run.
    """
    if clean.shape != adv.shape or len(labels) != len(clean):
        raise XferError(f"clean images {tuple(clean.shape)}, adversarial images {tuple(adv.shape)} and "
                        f"{len(labels)} labels do not describe one set of examples.")
    _check_shape(target, adv, "target")
    labels = labels.cpu().long()
    right_clean = (predict(target, clean, device) if clean_predictions is None else clean_predictions) == labels
    right_adv = predict(target, adv, device) == labels
    survived = right_clean.sum().item()
    return {
        names.CLEAN_ACC: right_clean.float().mean().item(),
        names.ADV_ACC: right_adv.float().mean().item(),
        names.SUCCESS_RATE: (right_clean & ~right_adv).sum().item() / survived if survived else math.nan,
    }


def as_unit(images: torch.Tensor) -> torch.Tensor:
    """Images as float in [0, 1]: uint8 is divided by 255, floats must already lie in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    x = images.float()
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise XferError(f"images must be uint8 or floats in [0, 1]; these range over [{x.min():.3g}, {x.max():.3g}] "
                        "(are they normalised already? xfer models normalise inside).")
    return x


def _check_surrogate(members: list[nn.Module], x: torch.Tensor, labels: torch.Tensor, entry: RegisteredAttack,
                     spec: AttackSpec) -> None:
    if not members:
        raise XferError("an ensemble surrogate needs at least one model.")
    if len(labels) != len(x):
        raise XferError(f"{len(x)} images but {len(labels)} labels.")
    for m in members:
        _check_shape(m, x, "surrogate")
    if spec.targeted and not entry.targeted:
        raise XferError(f"attack {spec.attack!r} has no targeted mode; attacks that do: "
                        f"{', '.join(n for n in list_attacks() if _ATTACKS.get(n).targeted)}.")
    if entry.loss == "features":
        if not all(isinstance(m, XferModel) for m in members):
            raise XferError(f"{spec.attack} attacks a model's body features, so its surrogate must be an xfer model.")
        return
    classes = {getattr(m, "num_classes", None) for m in members}
    if len(classes) > 1:
        raise XferError(f"ensemble members classify different numbers of classes ({', '.join(map(str, classes))}); "
                        "logits can only be averaged over one label set (use feature_pgd for surrogates of other tasks).")
    count = classes.pop()
    if count is not None and len(labels) and labels.max().item() >= count:
        raise XferError(f"labels go up to {labels.max().item()} but the surrogate has {count} classes: its head is "
                        "for another task; attack it with feature_pgd instead.")


def _check_shape(model: nn.Module, x: torch.Tensor, role: str) -> None:
    in_shape = getattr(model, "in_shape", None)
    if in_shape is not None and tuple(x.shape[1:]) != tuple(in_shape):
        raise XferError(f"the {role} takes images of shape {tuple(in_shape)} but these are {tuple(x.shape[1:])}; "
                        "surrogate, targets and attacked data must share one canonical image shape.")


def _num_classes(model: nn.Module) -> int:
    classes = getattr(model, "num_classes", None)
    if classes is None:
        raise XferError(f"a targeted attack draws wrong labels among the surrogate's classes, but {type(model).__name__} "
                        "has no num_classes; use an xfer model (xfer.models.build) or give it that attribute.")
    return int(classes)


@contextmanager
def _prepared(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, frozen parameters and `device` for the block; training flags, grads and device restored after."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    home = next(model.parameters(), torch.empty(0)).device
    model.eval().to(device)
    for p in grads:
        p.requires_grad_(False)  # attacks need input gradients only; this skips weight gradients
    try:
        yield
    finally:
        model.to(home)
        for m, training in modes.items():
            m.training = training
        for p, needed in grads.items():
            p.requires_grad_(needed)


def device_of(device: torch.device | str | None) -> torch.device:
    """`device`, else the GPU where there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- adversarial sets on disk ---------------------------------------------------------------------

@dataclass(frozen=True)
class Examples:
    """One adversarial set: what a generation run stores and every target is scored on."""

    clean: torch.Tensor          # uint8 N×C×H×W, the attacked task's test images
    adv: torch.Tensor            # float N×C×H×W in [0, 1] (stored as float16)
    labels: torch.Tensor         # int64 true labels
    indices: torch.Tensor        # int64 positions in the task's test split
    aims: torch.Tensor           # int64 labels the attack aimed at: targets if targeted, else the true labels
    class_names: tuple[str, ...]


def save_examples(path: Path, examples: Examples, spec: AttackSpec) -> Path:
    tensors = {"clean": examples.clean, "adv": examples.adv.half(), "labels": examples.labels,
               "indices": examples.indices, "aims": examples.aims}
    meta = {"attack": specs.canonical_json(spec), "class_names": json.dumps(list(examples.class_names))}
    # clone: untargeted `aims` is `labels` itself, and safetensors refuses tensors that share memory.
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def load_examples(path: Path) -> Examples:
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    return Examples(tensors["clean"], tensors["adv"].float(), tensors["labels"], tensors["indices"], tensors["aims"],
                    tuple(json.loads(meta["class_names"])))


def read_examples(run_id: str, sha: str | None = None, artifact_uri: str | None = None) -> Examples:
    """The adversarial set run `run_id` stored, verified against its sha256 tag (`sha`: that tag's value, and
    `artifact_uri`: the run's artifact location, when known: see `tracking.download_verified`)."""
    folder = tracking.download_verified(run_id, names.ADVERSARIAL_DIR, names.TAG_EXAMPLES_SHA, expected=sha,
                                        artifact_uri=artifact_uri)
    return load_examples(folder / EXAMPLES_FILE)
