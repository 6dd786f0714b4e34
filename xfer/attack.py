"""Attacks: a registry over torchattacks; adversarial examples made once per surrogate, evaluated on many targets.

The core is pure (`generate`, `evaluate`) and needs no MLflow; `plan` and `make_sets` are the attack
stage's first half: surrogates and targets are found by MLflow queries, checkpoints come only from MLflow
artifacts, and each (surrogate, attack setting) is one MLflow run whose adversarial set is an artifact (with its
sha256). Its scores on every target are rows of a table, not runs: `xfer.scores` is the second half.

Which loss a surrogate is attacked with (the label-set rule). An adversarial example of the target task
is made by raising the surrogate's loss on the task's labels, which only means something when the
surrogate's head classifies exactly the task's classes. So:
- a surrogate whose checkpoint `class_names` name the attacked task's labels (`data.same_labels`: MNIST's
  "0 - zero" is USPS's "0") is attacked with the requested attack on its logits (scratch models, every target
  as its own white-box reference, and pretrained models whose source shares the task's label set, e.g. QMNIST,
  USPS, SVHN or EMNIST digits for MNIST);
- a pretrained surrogate with another label set (KMNIST, FashionMNIST, EMNIST letters, ... for MNIST)
  has no head for the task; its *features* are what fine-tuning inherits, so it is attacked with
  `feature_pgd`: L∞ PGD that pushes the body's penultimate features away from the clean image's, a
  label-free feature-level transfer attack. Targeted attacks and CW (which need the task's labels) are
  not run from such surrogates. The attack that ran is the `attack` tag of every attack run.
Requesting `feature_pgd` itself puts every surrogate on the same footing (one loss for A and B sources).

`xfer bench --attack` times PGD generation on resnet_mini.
"""

from __future__ import annotations

import functools
import io
import json
import math
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from xfer import checkpoint, data, names, specs, stopping, tracking
from xfer.errors import XferError
from xfer.registry import Registry
from xfer.models import XferModel
from xfer.specs import AttackCellSpec, AttackSpec

if TYPE_CHECKING:
    from torchattacks.attack import Attack

GENERATE_BATCH = 1000   # examples per attack call: bounds activation memory of iterative attacks
EVAL_BATCH = 1000       # examples per forward pass when scoring targets
EXAMPLES_FILE = "examples.safetensors"

Builder = Callable[[nn.Module, AttackSpec], "Attack"]


# ---- the registry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttackKind:
    """A registered attack: how to build it and what it asks of the surrogate."""

    name: str
    build: Builder
    loss: str = "logits"     # "logits": raises the loss on the task's labels; "features": label-free feature distortion
    targeted: bool = True    # has a targeted mode
    linf: bool = True        # bounded by eps in L∞ (CW is an L2 attack and ignores eps)


_ATTACKS: Registry[AttackKind] = Registry("attack", "attacks", "the attack")


def attack(name: str, loss: str = "logits", targeted: bool = True, linf: bool = True) -> Callable[[Builder], Builder]:
    """Register `fn(model, spec) -> Attack` under `name`; `model` takes [0, 1] pixels."""

    def register(fn: Builder) -> Builder:
        _ATTACKS.add(name, AttackKind(name, fn, loss, targeted, linf))
        return fn

    return register


def list_attacks() -> list[str]:
    return _ATTACKS.names()


def kind(name: str) -> AttackKind:
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
    atk_kind = kind(spec.attack)
    members = list(surrogate) if isinstance(surrogate, (list, tuple)) else [surrogate]
    x = as_unit(images)
    labels = labels.long()
    _check_surrogate(members, x, labels, atk_kind, spec)
    if atk_kind.loss == "features":
        model: nn.Module = Features(members)
    else:
        model = members[0] if len(members) == 1 else Ensemble(members)
    aims = target_labels(labels, _num_classes(members[0]), spec.seed) if spec.targeted else labels
    device = _device(device)
    with _prepared(model, device), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        atk = atk_kind.build(model, spec)
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
    device = _device(device)
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
    predictions on `clean` when already known (`Context.clean_predictions`), so only `adv` is run.
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


def _check_surrogate(members: list[nn.Module], x: torch.Tensor, labels: torch.Tensor, atk_kind: AttackKind,
                     spec: AttackSpec) -> None:
    if not members:
        raise XferError("an ensemble surrogate needs at least one model.")
    if len(labels) != len(x):
        raise XferError(f"{len(x)} images but {len(labels)} labels.")
    for m in members:
        _check_shape(m, x, "surrogate")
    if spec.targeted and not atk_kind.targeted:
        raise XferError(f"attack {spec.attack!r} has no targeted mode; attacks that do: "
                        f"{', '.join(n for n in list_attacks() if _ATTACKS.get(n).targeted)}.")
    if atk_kind.loss == "features":
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


def _device(device: torch.device | str | None) -> torch.device:
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


# ---- the attack stage's sets: cells from MLflow, one MLflow run per adversarial set ------------------

FEATURE_ATTACK = "feature_pgd"   # what a surrogate of another label set runs instead of a logit attack


@dataclass(frozen=True)
class AttackCell:
    """One adversarial set: made once on the surrogate run(s), then scored on every target run (xfer.scores)."""

    spec: AttackCellSpec
    surrogate_run_ids: tuple[str, ...]   # several = an ensemble surrogate (logits averaged)
    target_run_ids: tuple[str, ...]

    @property
    def key(self) -> str:
        return specs.key(self.spec)

    @property
    def surrogate(self) -> str:
        """The surrogate run ids as the set's run records them (names.TAG_SURROGATE_RUN)."""
        return "+".join(self.surrogate_run_ids)


@dataclass(frozen=True)
class _Model:
    """A training run as the attack stage sees it: its MLflow record and its checkpoint's task facts."""

    record: tracking.RunRecord
    class_names: tuple[str, ...]
    in_shape: tuple[int, ...]

    @property
    def run_id(self) -> str:
        return self.record.run_id


SELF = "self"   # in `surrogate_stages`: each target attacked on itself (the white-box reference)


def plan(experiment: str, attacks: Sequence[AttackSpec], ensembles: bool = False, keys: Collection[str] | None = None,
         surrogate_stages: Sequence[str] = (names.PRETRAIN, names.SCRATCH, SELF),
         runs: dict[str, _Model] | None = None) -> list[AttackCell]:
    """The attack stage's cells (adversarial sets), from the experiment's finished training runs in MLflow.

    Targets of an attack setting are the fine-tuned and scratch runs trained on its dataset. Surrogates:
    every pretrained and every scratch run (scored on all targets of their input shape), and every
    fine-tuned run as its own white-box reference (scored on itself). A surrogate that does not
    classify the task's classes runs `feature_pgd` instead (see the module notes) and is skipped for
    targeted and L2 settings. `ensembles` adds, per pretraining source with two or more runs, one
    cell whose surrogate is all of them. Cells with equal keys are planned once. `keys` (a grid's cells) keeps
    only those runs (None: every training run of the experiment); `surrogate_stages` says whose examples are
    scored: pretrained and scratch models' on every target, and with SELF each target's own (white-box).
    `runs`: the experiment's `training_runs`, when the caller has them already.
    """
    for spec in attacks:
        kind(spec.attack)  # an unknown name fails before any look-up
    runs = {i: m for i, m in (training_runs(experiment) if runs is None else runs).items()
            if keys is None or m.record.key in keys}
    pretrained = [m for m in runs.values() if m.record.stage == names.PRETRAIN and names.PRETRAIN in surrogate_stages]
    scratch = [m for m in runs.values() if m.record.stage == names.SCRATCH and names.SCRATCH in surrogate_stages]
    cells: dict[str, AttackCell] = {}
    for spec in attacks:
        targets = [m for m in runs.values() if m.record.stage in (names.FINETUNE, names.SCRATCH)
                   and m.record.tags.get(names.TAG_TARGET) == spec.dataset]
        if not targets:
            continue
        task = targets[0]
        groups = [[m] for m in pretrained + scratch] + (_by_source(pretrained) if ensembles else [])
        for group in groups:
            chosen = _attack_for(spec, group, task.class_names)
            fits = [t.run_id for t in targets
                    if t.in_shape == group[0].in_shape and data.same_labels(t.class_names, task.class_names)]
            if chosen is not None and fits:
                _add(cells, chosen, group, fits)
        for target in targets if SELF in surrogate_stages else ():  # the white-box reference: a target on itself
            _add(cells, spec, [target], [target.run_id])
    return list(cells.values())


def made(records: Sequence[tracking.RunRecord], cells: Sequence[AttackCell], since: float | None = None
         ) -> dict[str, tracking.RunRecord]:
    """Each cell's adversarial set among finished attack runs `records`, by cell key: the newest run of its key made on
    the cell's own surrogate runs (a surrogate trained again, after --force, makes the set again), started at or after
    `since` when given (a forced re-run)."""
    wanted = {c.key: c.surrogate for c in cells}
    found: dict[str, tracking.RunRecord] = {}
    for record in records:   # oldest first: the newest wins
        if (record.key in wanted and record.tags.get(names.TAG_SURROGATE_RUN) == wanted[record.key]
                and names.TAG_EXAMPLES_SHA in record.tags
                and (since is None or record.start_time.timestamp() >= since)):
            found[record.key] = record
    return found


class Context:
    """What one process making adversarial sets shares: the training runs they attack, the attacked datasets, and
    every model loaded once."""

    def __init__(self, experiment: str, datasets: Mapping[str, data.Dataset] | None = None,
                 data_root: str | Path | None = None, parent_run_id: str | None = None,
                 runs: dict[str, _Model] | None = None, device: torch.device | str | None = None) -> None:
        self.experiment, self.data_root = experiment, data_root
        self.parent_run_id = parent_run_id   # the attack stage's run: set runs are its children
        self.device = _device(device)          # where its models live: loaded there once, never moved back and forth
        self.datasets = dict(datasets or {})
        self._runs = runs
        self._models: dict[str, nn.Module] = {}

    def runs(self, ids: Sequence[str]) -> list[_Model]:
        """The training runs `ids`, in order; refused unless each is finished with a checkpoint."""
        if self._runs is None:
            self._runs = training_runs(self.experiment)
        missing = [i for i in ids if i not in self._runs]
        if missing:
            raise XferError(f"run(s) {', '.join(missing)} are not finished training runs with a checkpoint in experiment "
                            f"{self.experiment!r}; plan the attack cells again (attack.plan) from what MLflow holds now.")
        return [self._runs[i] for i in ids]

    def model(self, run_id: str) -> nn.Module:
        """The model run `run_id` published, downloaded and verified once per process (attacks never change it)."""
        if run_id not in self._models:
            known = self._runs.get(run_id) if self._runs is not None else None
            self._models[run_id] = tracking.load_model(run_id, known.record if known else None)[0].to(self.device)
        return self._models[run_id]

    def dataset(self, name: str) -> data.Dataset:
        """The attacked task's data: handed over by the stage (Ray's object store), else loaded here."""
        if name not in self.datasets:
            self.datasets[name] = data.load(name, self.data_root)
        return self.datasets[name]

    def made(self, cells: Sequence[AttackCell]) -> dict[str, tracking.RunRecord]:
        """The cells' sets already made (by a retried trial's earlier attempt, say): a search per cell."""
        return made(tracking.query_keys(self.experiment, [c.key for c in cells], names.ATTACK), cells)


def _add(cells: dict[str, AttackCell], spec: AttackSpec, surrogates: list[_Model], targets: list[str]) -> None:
    ordered = sorted(surrogates, key=lambda m: m.record.key)
    cell = AttackCell(AttackCellSpec("+".join(m.record.key for m in ordered), spec),
                      tuple(m.run_id for m in ordered), tuple(targets))
    cells.setdefault(cell.key, cell)


def _attack_for(spec: AttackSpec, surrogates: list[_Model], task_classes: tuple[str, ...]) -> AttackSpec | None:
    """The label-set rule: the asked attack if the surrogates classify the task's classes, else feature_pgd (or none)."""
    asked = kind(spec.attack)
    if asked.loss == "features" or all(data.same_labels(m.class_names, task_classes) for m in surrogates):
        return spec
    if spec.targeted or not asked.linf:
        return None  # a targeted or L2 attack needs a head over the task's labels
    return specs.replace(spec, attack=FEATURE_ATTACK)


def _by_source(pretrained: list[_Model]) -> list[list[_Model]]:
    groups: dict[tuple[str, tuple[int, ...]], list[_Model]] = {}
    for m in pretrained:
        groups.setdefault((m.record.tags.get(names.TAG_SOURCE, ""), m.in_shape), []).append(m)
    return [g for g in groups.values() if len(g) > 1]


def training_runs(experiment: str, snapshot: tracking.Snapshot | None = None) -> dict[str, _Model]:
    """Finished training runs that published a checkpoint, by run id, with their models' label sets and input shapes:
    of a cell run more than once (--force), its newest run only, the model the cell holds now.

    Both come from the run's tags (names.TAG_CLASSES, TAG_IN_SHAPE); a run recorded before those tags existed
    has its checkpoint's meta.json read instead. `snapshot`: the experiment's runs, listed already.
    """
    newest: dict[str, tracking.RunRecord] = {}
    for stage in tracking.TRAINING_STAGES:
        records = snapshot.query(stage) if snapshot is not None else tracking.query(experiment, stage)
        for record in records:   # oldest first: the newest run of a key wins
            if names.TAG_CHECKPOINT_SHA in record.tags:
                newest[record.key or record.run_id] = record
    found: dict[str, _Model] = {}
    for record in newest.values():
        if names.TAG_CLASSES in record.tags and names.TAG_IN_SHAPE in record.tags:
            classes = json.loads(record.tags[names.TAG_CLASSES])
            shape = [int(d) for d in record.tags[names.TAG_IN_SHAPE].split("x")]
        else:
            meta = _checkpoint_meta(record.run_id)
            classes, shape = meta["class_names"], meta["in_shape"]
        found[record.run_id] = _Model(record, tuple(classes), tuple(shape))
    return found


def _checkpoint_meta(run_id: str) -> dict[str, Any]:
    # Only meta.json: planning must not download every model's weights.
    with tempfile.TemporaryDirectory(prefix="xfer-meta-") as tmp:
        path = tracking.download_artifact(run_id, f"{names.CHECKPOINT_DIR}/{checkpoint.META}", Path(tmp))
        return json.loads(path.read_text())


def make_set(cell: AttackCell, context: Context, device: torch.device | str | None = None) -> str:
    """Make one cell's adversarial set and store it as an MLflow run (a child of `context.parent_run_id`): the
    examples as an artifact with their sha256, the surrogate's white-box success, the seconds it took.

    Returns the set's run id. Refuses, before any work, surrogates that do not fit the attacked task.
    """
    spec = cell.spec.attack
    surrogates = context.runs(cell.surrogate_run_ids)
    dataset = context.dataset(spec.dataset)
    _check_cell(spec, surrogates, [], dataset.class_names, dataset.in_shape)
    index = data.stratified_indices(dataset.test.labels, spec.n, spec.seed)
    clean, labels = dataset.test.images[index], dataset.test.labels[index]
    models_ = [context.model(m.run_id) for m in surrogates]
    began = time.perf_counter()
    adv = generate(models_, clean, labels, spec, device)
    aims = target_labels(labels, len(dataset.class_names), spec.seed) if spec.targeted else labels
    # Scored as stored: float16, so a fresh set and one read back from MLflow give the same numbers.
    examples = Examples(clean, adv.half().float(), labels, index, aims, dataset.class_names)
    whitebox = _whitebox_success(models_, examples, spec, device)
    seconds = time.perf_counter() - began
    with tempfile.TemporaryDirectory(prefix="xfer-adv-") as tmp:
        folder = Path(tmp) / names.ADVERSARIAL_DIR
        folder.mkdir()
        save_examples(folder / EXAMPLES_FILE, examples, spec)
        tags = {**_set_tags(cell), names.TAG_EXAMPLES_SHA: checkpoint.sha256(folder)}
        with tracking.start_run(context.experiment, names.ATTACK, cell.key, tags=tags, params=cell.spec,
                                run_name=_run_name(cell, surrogates), parent_run_id=context.parent_run_id) as run:
            run.log_artifact(folder)
            run.log_metrics({names.WHITEBOX_SUCCESS: whitebox, names.SECONDS: seconds})
    return run.run_id


def make_sets(experiment: str, cells: Sequence[AttackCell], device: torch.device | str | None = None,
              context: Context | None = None, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, str]:
    """A pack of adversarial sets in one process, sharing models and data; sets already made are skipped, and none is
    started once the grid is stopping. Returns the failed cells' reasons by key: a cell refused for bad input
    (`XferError`) fails alone and its pack-mates go on. `progress` hears each cell's end."""
    context = context or Context(experiment, device=device)
    done = context.made(cells)
    failed: dict[str, str] = {}
    for count, cell in enumerate(cells, 1):
        if stopping.requested():
            break   # the grid is stopping: the rest are made by the rerun
        if cell.key not in done:
            try:
                make_set(cell, context, device)
            except XferError as exc:
                failed[cell.key] = str(exc)
        if progress is not None:
            progress({"cell": label(cell), "cell_finished": float(cell.key not in failed),
                      "reason": failed.get(cell.key, ""), "cells_done": float(count), "cells": float(len(cells))})
    return failed


def label(cell: AttackCell) -> str:
    a = cell.spec.attack
    return (f"{a.attack}{' targeted' if a.targeted else ''} eps={a.eps:g} from {cell.spec.surrogate_key[:12]} "
            f"→ {len(cell.target_run_ids)} target(s)")


def check_targets(spec: AttackSpec, targets: Sequence[_Model], class_names: tuple[str, ...],
                  in_shape: tuple[int, ...]) -> None:
    """Refuse targets that do not classify the attacked task's classes from its images."""
    _check_cell(spec, [], targets, class_names, in_shape)


def _check_cell(spec: AttackSpec, surrogates: Sequence[_Model], targets: Sequence[_Model], class_names: tuple[str, ...],
                in_shape: tuple[int, ...]) -> None:
    """Refuse, before any work, a cell whose models do not fit the attacked task."""
    task = f"{spec.dataset} ({len(class_names)} classes, images {tuple(in_shape)})"
    for role, group in (("surrogate", surrogates), ("target", targets)):
        for m in group:
            if m.in_shape != tuple(in_shape):
                raise XferError(f"{role} run {m.run_id} takes images of shape {m.in_shape}, but the attacked task is {task}; "
                                "surrogates and targets must share the task's image shape.")
    for m in targets:
        if not data.same_labels(m.class_names, class_names):
            raise XferError(f"target run {m.run_id} classifies {len(m.class_names)} classes ({', '.join(m.class_names[:5])}, ...), "
                            f"not those of {task}; targets must be trained on the attacked task.")
    if kind(spec.attack).loss == "logits":
        for m in surrogates:
            if not data.same_labels(m.class_names, class_names):
                raise XferError(f"surrogate run {m.run_id} classifies other classes than {task}, so {spec.attack!r} has "
                                f"no loss to raise on its logits; attack it with {FEATURE_ATTACK!r} (attack.plan does).")


def _whitebox_success(models_: list[nn.Module], examples: Examples, spec: AttackSpec,
                      device: torch.device | str | None) -> float:
    """Success on the surrogate itself; for a feature attack, the share of its own predictions that flip."""
    model = models_[0] if len(models_) == 1 else Ensemble(models_)
    truth = predict(model, examples.clean, device) if kind(spec.attack).loss == "features" else examples.labels
    return evaluate(model, examples.clean, examples.adv, truth, device)[names.SUCCESS_RATE]


def _set_tags(cell: AttackCell) -> dict[str, str]:
    return {**tracking.spec_tags(cell.spec), names.TAG_SURROGATE_RUN: cell.surrogate,
            names.TAG_TARGET: cell.spec.attack.dataset}


def _run_name(cell: AttackCell, surrogates: Sequence[_Model]) -> str:
    a = cell.spec.attack
    return f"{a.attack}{'-targeted' if a.targeted else ''}(eps={a.eps:g}) on {' + '.join(model_label(m) for m in surrogates)}"


def model_label(m: _Model) -> str:
    """A training run in words: stage, source → target, arch, size, freeze, seed."""
    tags = m.record.tags
    source, target = tags.get(names.TAG_SOURCE, ""), tags.get(names.TAG_TARGET, "")
    where = f"{source}→{target}" if source and target else source or target
    freeze = f" f{tags.get(names.TAG_FREEZE)}" if m.record.stage == names.FINETUNE else ""
    size = f" n={tags.get(names.TAG_SIZE)}" if m.record.stage != names.PRETRAIN else ""
    return f"{m.record.stage} {where} {tags.get(names.TAG_ARCH, '')}{size}{freeze} seed={tags.get(names.TAG_SEED, '')}"
