"""Checkpoints on disk: safetensors weights + JSON metadata, and their sha256; nothing is ever unpickled.

Two kinds share one layout:
- a *model* checkpoint (``save`` / ``load``): what a run publishes and later stages consume;
- a *training state* (``save_state`` / ``load_state``): model + optimiser + scheduler + position in
  training, written every epoch so a killed trial resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from xfer import models
from xfer.errors import XferError

FORMAT = "xfer-checkpoint/1"
STATE_FORMAT = "xfer-train-state/1"
WEIGHTS = "weights.safetensors"
META = "meta.json"


def save(directory: Path, model: models.XferModel, meta: dict[str, Any] | None = None) -> Path:
    """Write ``weights.safetensors`` and ``meta.json`` (arch, shapes, plus the caller's meta) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_cpu_contiguous(model.state_dict()), str(directory / WEIGHTS))
    record = {
        "format": FORMAT,
        "arch": model.arch,
        "in_shape": list(model.in_shape),
        "num_classes": model.num_classes,
        "arch_kwargs": dict(model.arch_kwargs),
        **(meta or {}),
    }
    (directory / META).write_text(json.dumps(record, indent=2, sort_keys=True, default=_json_default))
    return directory


def read_meta(directory: Path) -> dict[str, Any]:
    """The checkpoint's metadata, validated to be an xfer checkpoint."""
    directory = Path(directory)
    meta_path, weights_path = directory / META, directory / WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise XferError(
            f"no xfer checkpoint at {directory}: expected {META} and {WEIGHTS} there. Point to a folder "
            "written by xfer (an MLflow run's 'checkpoint' artifact) or re-run the cell that produces it."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise XferError(f"checkpoint metadata {meta_path} is not valid JSON ({exc}); re-run the cell that wrote it.") from None
    if meta.get("format") != FORMAT:
        raise XferError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}; it was not written by this xfer.")
    return meta


def load(
    directory: Path,
    expect_arch: str | None = None,
    expect_in_shape: tuple[int, int, int] | None = None,
    expect_num_classes: int | None = None,
) -> tuple[models.XferModel, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights, refusing any mismatch."""
    meta = read_meta(directory)
    in_shape = tuple(meta["in_shape"])
    wanted = {"arch": expect_arch, "input shape": expect_in_shape, "number of classes": expect_num_classes}
    found = {"arch": meta["arch"], "input shape": in_shape, "number of classes": meta["num_classes"]}
    wrong = [f"{k} {found[k]} (expected {v})" for k, v in wanted.items() if v is not None and _tuple_or(v) != _tuple_or(found[k])]
    if wrong:
        raise XferError(
            f"checkpoint at {directory} does not fit: it has " + ", ".join(wrong) + ". Use a checkpoint trained "
            "for this arch and data shape, or change the spec to match the checkpoint."
        )
    model = models.build(meta["arch"], in_shape, meta["num_classes"], **meta.get("arch_kwargs", {}))
    state = load_file(str(Path(directory) / WEIGHTS))
    _load_strict(model, state, directory)
    return model, meta


def _tuple_or(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad_shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad_shapes:
        detail = "; ".join(
            part for part in (
                f"missing {', '.join(missing[:5])}" if missing else "",
                f"unexpected {', '.join(unexpected[:5])}" if unexpected else "",
                f"shape mismatch {', '.join(bad_shapes[:5])}" if bad_shapes else "",
            ) if part
        )
        raise XferError(f"weights in {where} do not match the architecture its metadata names ({detail}); the checkpoint is damaged or from another version.")
    model.load_state_dict(state, strict=True)


@dataclass
class TrainState:
    """Where a training run stands after a finished epoch: enough to resume it exactly."""

    epoch: int                                  # epochs completed
    step: int                                   # optimisation steps taken
    seconds: float                              # training wall-clock so far
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    curve: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def save_state(directory: Path, state: TrainState) -> Path:
    """Training state as safetensors (all tensors) + JSON (everything else)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in state.model.items()}
    opt_state_json: dict[str, dict[str, Any]] = {}
    for idx, slots in state.optimizer["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                opt_state_json.setdefault(str(idx), {})[name] = value
    save_file(_cpu_contiguous(tensors), str(directory / WEIGHTS))
    record = {
        "format": STATE_FORMAT,
        "epoch": state.epoch,
        "step": state.step,
        "seconds": state.seconds,
        "optimizer_param_groups": state.optimizer["param_groups"],
        "optimizer_scalars": opt_state_json,
        "scheduler": state.scheduler,
        "curve": state.curve,
        "extra": state.extra,
    }
    (directory / META).write_text(json.dumps(record, default=_json_default))
    return directory


def load_state(directory: Path) -> TrainState:
    directory = Path(directory)
    record = json.loads((directory / META).read_text(), parse_constant=_parse_constant)
    if record.get("format") != STATE_FORMAT:
        raise XferError(f"{directory} holds no xfer training state (format {record.get('format')!r}).")
    tensors = load_file(str(directory / WEIGHTS))
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    for idx, scalars in record["optimizer_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(scalars)
    return TrainState(
        epoch=record["epoch"],
        step=record["step"],
        seconds=record["seconds"],
        model=model_state,
        optimizer={"state": opt_state, "param_groups": record["optimizer_param_groups"]},
        scheduler=record["scheduler"],
        curve=record["curve"],
        extra=record["extra"],
    )


def sha256(directory: Path) -> str:
    """sha256 over a folder's files: each relative name, size and bytes, in sorted name order."""
    directory = Path(directory)
    files = sorted((p.relative_to(directory).as_posix(), p) for p in directory.rglob("*") if p.is_file())
    if not files:
        raise XferError(f"no checkpoint files in {directory}; write the checkpoint (xfer.checkpoint.save) before logging it.")
    digest = hashlib.sha256()
    for name, path in files:
        for part in (name.encode(), str(path.stat().st_size).encode()):
            digest.update(len(part).to_bytes(8, "big") + part)  # length-prefixed: no two folders hash alike
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _cpu_contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone breaks any sharing.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} to checkpoint JSON")


def _parse_constant(name: str) -> float:
    return {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}[name]
