"""Architecture registry: every model is an `XferModel` = input normalisation + body + replaceable head.

Models take images in [0, 1] and normalise inside (so attacks and training see the same pixels), and
their parameter tensors, in registration order, are the unit of freezing: ``freeze(model, k)`` freezes
the first k tensors, which is exactly how the seed counted ("AlexNet freeze 8" = conv1–conv4's weights
and biases; "ResNet freeze 20 / 23"). ``xfer archs NAME`` prints an arch's tensor table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xfer.errors import XferError
from xfer.registry import Registry

Shape = tuple[int, int, int]
Builder = Callable[..., tuple[nn.Module, int]]   # (in_shape, **kwargs) -> (body, feature_dim)

_ARCHS: Registry[Builder] = Registry("architecture", "architectures", "the architecture", short="arch")
# Archs registered by another module, imported on first use: any process (a Ray worker rebuilding a recorded
# model, the report) can build every arch without knowing which module defines it.
_REGISTERED_ELSEWHERE = {"adder_transfer": "xfer.adder", "adder_features": "xfer.adder", "adder_scratch": "xfer.adder"}


def arch(name: str) -> Callable[[Builder], Builder]:
    """Register a body builder under `name`; the head is added by `build`."""

    def register(fn: Builder) -> Builder:
        _ARCHS.add(name, fn)
        return fn

    return register


def list_archs() -> list[str]:
    return sorted({*_ARCHS, *_REGISTERED_ELSEWHERE})


class XferModel(nn.Module):
    """`head(body((x - mean) / std))` with the facts a checkpoint needs to rebuild it."""

    def __init__(self, arch_name: str, in_shape: Shape, num_classes: int, body: nn.Module, feature_dim: int,
                 mean: tuple[float, ...], std: tuple[float, ...], arch_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.arch = arch_name
        self.in_shape = tuple(in_shape)
        self.num_classes = num_classes
        self.arch_kwargs = dict(arch_kwargs)
        channels = in_shape[0]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, channels, 1, 1))
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body((x - self.mean) / self.std))


def build(name: str, in_shape: Shape, num_classes: int, mean: tuple[float, ...] | None = None,
          std: tuple[float, ...] | None = None, weights: str | Path | None = None, **kwargs: Any) -> XferModel:
    """The only way to make a model: `build("resnet_mini", (1, 28, 28), 10)`.

    `mean`/`std` are the training data's channel statistics in [0, 1] units (identity when omitted).
    `weights` (resnet18 only) initialises the body from ImageNet weights; it is not part of the arch.
    """
    if name not in _ARCHS and name in _REGISTERED_ELSEWHERE:
        import importlib

        importlib.import_module(_REGISTERED_ELSEWHERE[name])
    body_of = _ARCHS.get(name, known=list_archs())
    in_shape = tuple(int(v) for v in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1 or num_classes < 2:
        raise XferError(f"cannot build {name} for input shape {in_shape} and {num_classes} classes; "
                        "expected a C×H×W shape and at least 2 classes.")
    channels = in_shape[0]
    mean = tuple(mean) if mean is not None else (0.0,) * channels
    std = tuple(std) if std is not None else (1.0,) * channels
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise XferError(f"normalisation mean {mean} / std {std} does not fit {channels} input channel(s).")
    extra = {"weights": weights} if weights is not None else {}
    body, feature_dim = body_of(in_shape, **kwargs, **extra)
    return XferModel(name, in_shape, num_classes, body, feature_dim, mean, std, kwargs)


def check_input_shape(model: XferModel, in_shape: Sequence[int], data_name: str, remedy: str, who: str = "") -> None:
    """Refuse data whose images are not the shape `model` was built for (a pretrained model meeting another task's
    data), naming both shapes and what to do; `who` prefixes the cell it is about."""
    if tuple(model.in_shape) != tuple(in_shape):
        raise XferError(f"{who}the pretrained {model.arch} expects inputs {tuple(model.in_shape)} but {data_name} has "
                        f"{tuple(in_shape)}; {remedy}.")


# ---- freezing and heads -------------------------------------------------------------------------

def layers(model: XferModel) -> list[tuple[str, nn.Parameter]]:
    """The ordered parameter tensors of the body: freeze depth k freezes the first k of them."""
    return list(model.body.named_parameters())


def max_freeze_depth(model: XferModel) -> int:
    return len(layers(model))


def freeze(model: XferModel, depth: int) -> None:
    """Freeze the first `depth` body tensors (the head is never frozen)."""
    body = layers(model)
    if not 0 <= depth <= len(body):
        raise XferError(f"freeze depth {depth} is beyond {model.arch}'s {len(body)} body parameter tensors; "
                        f"choose 0..{len(body)} (`xfer archs {model.arch}` lists them).")
    for _, param in body[:depth]:
        param.requires_grad_(False)


def unfreeze(model: XferModel) -> None:
    for param in model.parameters():
        param.requires_grad_(True)


def head_parameters(model: XferModel) -> Iterator[nn.Parameter]:
    return model.head.parameters()


def backbone_parameters(model: XferModel) -> Iterator[nn.Parameter]:
    return model.body.parameters()


def replace_head(model: XferModel, num_classes: int) -> XferModel:
    """A freshly initialised head for a new label set (fine-tuning always starts from a new head)."""
    device = model.head.weight.device
    model.head = nn.Linear(model.head.in_features, num_classes).to(device)
    model.num_classes = num_classes
    return model


# ---- the seed's architectures -------------------------------------------------------------------

@arch("alexnet_mini")
def _alexnet_mini(in_shape: Shape, dropout: float = 0.5) -> tuple[nn.Module, int]:
    """The seed's AlexNet for 28×28: conv 32-64-128-256-256, fc 1024-512 (+ head): 16 tensors."""
    c, h, w = in_shape
    features = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    flat = 256 * (h // 8) * (w // 8)
    body = nn.Sequential(
        features, nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(flat, 1024), nn.ReLU(inplace=True),
        nn.Dropout(dropout), nn.Linear(1024, 512), nn.ReLU(inplace=True),
    )
    return body, 512


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers and a 1×1 conv-BN projection shortcut (the seed projects in every block)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@arch("resnet_mini")
def _resnet_mini(in_shape: Shape, widths: tuple[int, int, int] = (16, 32, 64)) -> tuple[nn.Module, int]:
    """The seed's 3-stage BasicBlock ResNet (16/32/64): 30 body tensors + 2 head = 32."""
    c = in_shape[0]
    w1, w2, w3 = widths
    body = nn.Sequential(
        nn.Conv2d(c, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
        BasicBlock(w1, w1, 1), BasicBlock(w1, w2, 2), BasicBlock(w2, w3, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return body, w3


class MixerBlock(nn.Module):
    """Pre-norm residual token mixing (Conv1d over the token axis) then channel mixing."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mix = nn.Sequential(nn.Conv1d(tokens, token_hidden, 1), nn.GELU(), nn.Conv1d(token_hidden, tokens, 1))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mix = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: batch × tokens × dim
        x = x + self.token_mix(self.norm1(x))
        return x + self.channel_mix(self.norm2(x))


class _Mixer(nn.Module):
    def __init__(self, channels: int, patch: int, dim: int, depth: int, tokens: int) -> None:
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*(MixerBlock(tokens, dim, tokens * 4, dim // 2) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # batch × tokens × dim
        return self.norm(self.blocks(x)).mean(1)


@arch("mlp_mixer")
def _mlp_mixer(in_shape: Shape, depth: int = 1, patch: int = 4, dim: int = 128) -> tuple[nn.Module, int]:
    """Image 28, patch 4 → 49 tokens, dim 128; token mixing 49→196→49, channel mixing 128→64→128."""
    c, h, w = in_shape
    if h % patch or w % patch or depth < 1:
        raise XferError(f"mlp_mixer needs a depth ≥ 1 and an image size divisible by its patch {patch}; got {in_shape}, depth {depth}.")
    return _Mixer(c, patch, dim, depth, (h // patch) * (w // patch)), dim


@arch("mlp_mixer2")
def _mlp_mixer2(in_shape: Shape, patch: int = 4, dim: int = 128) -> tuple[nn.Module, int]:
    """The seed's depth-2 mixer, named so that it can be a grid axis value."""
    return _mlp_mixer(in_shape, depth=2, patch=patch, dim=dim)


@arch("lenet5")
def _lenet5(in_shape: Shape) -> tuple[nn.Module, int]:
    """The seed's sigmoid LeNet-5 (avg-pool) for 28×28; the ReLU/max-pool variant for 32×32 (colour or gray)."""
    c, h, w = in_shape
    if (h, w) == (28, 28):
        act, pool, pad = nn.Sigmoid, nn.AvgPool2d, 2
    elif (h, w) == (32, 32):
        act, pool, pad = nn.ReLU, nn.MaxPool2d, 0
    else:
        raise XferError(f"lenet5 takes 28×28 (seed's sigmoid LeNet) or 32×32 (ReLU variant) inputs, not {h}×{w}.")
    body = nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=pad), act(), pool(2),
        nn.Conv2d(6, 16, 5), act(), pool(2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), act(), nn.Linear(120, 84), act(),
    )
    return body, 84


@arch("lenet5_maxpool")
def _lenet5_maxpool(in_shape: Shape) -> tuple[nn.Module, int]:
    """Seed 003's MNIST LeNet-5 as the seed built it: sigmoid, 2×2 max-pools, the first convolution padded by 2 on
    28×28 (unpadded on 32×32, LeCun's input size). xfer's `lenet5` pools by average on 28×28, and keeps doing so:
    its recorded cells and attack references stay what they were."""
    c, h, w = in_shape
    pad = {(28, 28): 2, (32, 32): 0}.get((h, w))
    if pad is None:
        raise XferError(f"lenet5_maxpool takes 28×28 (seed 003's MNIST LeNet-5) or 32×32 inputs, not {h}×{w}.")
    body = nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=pad), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.Sigmoid(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(), nn.Linear(120, 84), nn.Sigmoid(),
    )
    return body, 84


def digit_body(channels: int, h: int, w: int) -> nn.Sequential:
    """The adder seed's per-digit CNN: conv 32-64 (3×3, each followed by a 2×2 max-pool), fc 128: 128 features."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * (h // 4) * (w // 4), 128), nn.ReLU(inplace=True),
    )


@arch("digit_cnn")
def _digit_cnn(in_shape: Shape) -> tuple[nn.Module, int]:
    """The adder's scratch-arm CNN as a digit classifier (+ a 128 → 10 head). Pretrained as the adder's
    classifier, it makes the adder's features arm the scratch arm with a pretrained start: nothing else differs."""
    return digit_body(*in_shape), 128


@arch("resnet18")
def _resnet18(in_shape: Shape, weights: str | Path | None = None) -> tuple[nn.Module, int]:
    """torchvision's ResNet-18 for small inputs: 3×3 stride-1 stem, no max-pool, fc removed.

    `weights` = a local file of torchvision's ImageNet weights (resnet18-f37072fd.pth) or "imagenet" to let
    torchvision fetch them; every tensor but the (replaced) stem and fc is loaded.
    """
    import torchvision

    net = torchvision.models.resnet18()
    if weights is not None:
        state = _imagenet_state(weights)
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "conv1."))}
        net.load_state_dict(state, strict=False)
    net.conv1 = nn.Conv2d(in_shape[0], 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    # conv1 is re-created above, so registration order would put it last: rebuild in forward order.
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.layer1, net.layer2, net.layer3, net.layer4,
                         net.avgpool, nn.Flatten())
    return body, 512


def _imagenet_state(weights: str | Path) -> dict[str, torch.Tensor]:
    if str(weights) == "imagenet":
        import torchvision

        try:
            return torchvision.models.ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as exc:  # offline: urllib raises a variety of errors
            raise XferError(
                f"could not fetch torchvision's ImageNet ResNet-18 weights ({type(exc).__name__}: {exc}). "
                "With no network, download resnet18-f37072fd.pth elsewhere and pass its path as the weights."
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise XferError(f"ImageNet weights file {path} does not exist; pass the path of torchvision's "
                        "resnet18-f37072fd.pth, or 'imagenet' to download it with network access.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # weights_only: never unpickle code
    except Exception as exc:
        raise XferError(f"{path} is not a readable torch state dict ({exc}); use torchvision's resnet18 weights file.") from None


def describe(name: str, in_shape: Shape = (1, 28, 28), num_classes: int = 10, **kwargs: Any) -> str:
    """A table of the arch's parameter tensors with their freeze depth (1-based, head last)."""
    model = build(name, in_shape, num_classes, **kwargs)
    rows = [f"{i:>3}  {n:<40} {tuple(p.shape)}" for i, (n, p) in enumerate(layers(model), 1)]
    rows += [f"  -  head.{n:<35} {tuple(p.shape)}" for n, p in model.head.named_parameters()]
    params = sum(p.numel() for p in model.parameters())
    return f"{name} {in_shape} → {num_classes}: {len(rows)} tensors, {params:,} parameters\n" + "\n".join(rows)
