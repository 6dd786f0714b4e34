"""The main job: the whole transfer study (pretrain → fine-tune/scratch → attack → report) on Ray Tune.

    python sweeps/full_grid.py                  # the seed experiment (needs its torchvision data)
    python sweeps/full_grid.py --preset smoke   # embedded offline data, minutes on a laptop CPU
    python sweeps/full_grid.py --grid my.yaml --sizes 500 1000 --dry-run
    python sweeps/full_grid.py --preset cifar10  # a target's grid file from sweeps/presets/ (see --preset)
    python sweeps/full_grid.py --preset lenet --recipes plain head10x_sgd unfreeze --unfreeze-epoch 4

Ray: RAY_ADDRESS / --address joins a cluster (`ray up cluster.yaml`), else Ray starts locally.
MLflow: MLFLOW_TRACKING_URI is used as is, else a local server on 127.0.0.1 keeps the runs under ./runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from xfer import grid as grids  # noqa: E402
from xfer import packs, pipeline, progress, tracking  # noqa: E402  (light: torch, Ray, MLflow load when used)
from xfer.cli import run_main  # noqa: E402
from xfer.stages import RunOptions  # noqa: E402

# Grid axes settable on the command line: flag → (Grid field, element type).
AXES = {
    "sources": str, "archs": str, "sizes": int, "lrs": float, "seeds": int, "recipes": str, "attacks": str, "eps": float,
    "attack_surrogates": str,
}
SCALARS = {
    "name": str, "target": str, "epochs": int, "pretrain_epochs": int, "pretrain_size": int, "batch_size": int,
    "val_size": int, "optimizer": str, "unfreeze_epoch": int, "unfreeze_lr_mult": float, "weights": str,
    "attack_n": int, "attack_steps": int,
}
HELP = {
    "recipes": f"fine-tuning recipes: {', '.join(grids.RECIPES)}, or several joined with '+' (e.g. head10x_sgd+unfreeze)",
    "unfreeze_epoch": "epoch at which the unfreeze recipe unfreezes every layer (0 = half of --epochs)",
    "weights": "resnet18's ImageNet weights: a resnet18-f37072fd.pth file, or 'imagenet' (torchvision's cache or download)",
    "attack_surrogates": "whose adversarial examples are scored: pretrain and scratch (on every target), self (each "
                         "target on itself); default all three",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seed", choices=grids.list_presets(), metavar="NAME",
                   help=f"base grid (default: seed): {', '.join(grids.list_presets())}; built-ins are "
                        f"{', '.join(grids.PRESETS)}, the others are the grid files in sweeps/presets/")
    p.add_argument("--grid", type=Path, help="YAML or TOML file of grid settings, applied over the preset")
    for axis, kind in AXES.items():
        p.add_argument(f"--{axis.replace('_', '-')}", dest=axis, nargs="+", type=kind, help=HELP.get(axis, f"override the {axis} axis"))
    p.add_argument("--freeze", nargs="+", help="freeze depths in tensors: `0 8` for every arch or `resnet_mini=0,20,23`")
    for name, kind in SCALARS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=HELP.get(name))
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip on every training cell (default: the preset's)")
    p.add_argument("--no-scratch", action="store_true", help="skip the scratch baselines")
    p.add_argument("--data-root", default=None, help="torchvision data root (default $XFER_DATA or ./data)")
    p.add_argument("--download", action="store_true", help="download missing torchvision datasets (needs network)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="image folders: leave unreadable files out (listed in the summary and in MLflow) instead of stopping")
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else local Ray)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=None, help="fractional GPUs per trial (default $XFER_GPUS_PER_TRIAL, else 1/4 when GPUs exist)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="data-parallel Ray Train workers per trial")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashed trial (each cell resumes from its last epoch)")
    p.add_argument("--pack-size", type=int, default=None,
                   help=f"cells trained per trial, in one process (1 = one cell per trial; default {packs.PACK_SIZE['cpu']} "
                        f"on CPU, {packs.PACK_SIZE['cuda']} on GPU, and packs are split so every trial slot has work)")
    p.add_argument("--vectorise", choices=packs.VECTORISE, default="auto",
                   help="train a pack's cells as one batched model: auto (on a GPU, and on a CPU where it measures "
                        "faster), always (wherever it can), never")
    p.add_argument("--checkpoint-every", type=float, default=packs.CHECKPOINT_INTERVAL_S, metavar="SECONDS",
                   help="hand a pack's epoch states to Tune at most this often (a killed pack loses at most this much)")
    p.add_argument("--storage-path", default=None, help="Ray storage for trial checkpoints (s3:// or NFS on a cluster)")
    p.add_argument("--stages", nargs="+", default=list(pipeline.STAGE_ORDER), choices=pipeline.STAGE_ORDER)
    p.add_argument("--tuned", action="store_true", help="use the best Optuna configuration per (arch, size) from MLflow")
    p.add_argument("--force", action="store_true", help="re-run cells that already finished")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan: each stage's cells, what MLflow has, packs and an estimate of the wall time "
                        "(the data need not be here); run nothing")
    p.add_argument("--gpus", type=int, default=0, metavar="G", help="--dry-run: estimate the wall time on G GPUs too")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="Ray's and Tune's own output on the terminal too (by default it goes to a log in the runs folder)")
    return p


def grid_from_args(args: argparse.Namespace) -> grids.Grid:
    values = grids.preset_values(args.preset)
    if args.grid:
        values.update(grids.load_file(args.grid))
    for key in (*AXES, *SCALARS, "freeze", "augment"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.no_scratch:
        values["scratch"] = False
    if args.archs is not None and args.freeze is None:
        # --archs picks some of the preset's archs: its freeze depths for the others no longer apply.
        freeze = grids.parse_freeze(values.get("freeze", grids.Grid().freeze))
        values["freeze"] = {arch: depths for arch, depths in freeze.items() if arch in args.archs or arch == "*"}
    return grids.make(**values)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    grid = grid_from_args(args)
    options = RunOptions(
        experiment=grid.name, data_root=args.data_root, download=args.download, skip_bad_images=args.skip_bad_images,
        address=args.address,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, workers_per_trial=args.workers_per_trial,
        max_failures=args.max_failures, storage_path=args.storage_path, force=args.force, pack_size=args.pack_size,
        checkpoint_interval_s=args.checkpoint_every, vectorise=args.vectorise, verbose=args.verbose,
    )
    if args.tuned:
        from xfer import tuning

        grids.validate(grid)   # a bad grid is refused before the tuning look-up starts the MLflow server
        tracking.ensure_server()
        grid = tuning.apply_best(grid, echo=print)
    if args.dry_run:   # the plan and its cost, with or without the data; starts no Ray and no trial
        pipeline.dry_run(grid, options, gpus=args.gpus)
        return 0
    prepared = pipeline.prepare(grid, options)   # every refusal happens here: no MLflow server, no Ray yet
    tracking.ensure_server()
    log = progress.log_path(grid.name)
    if not args.verbose:   # Ray's banners, Tune's tables and worker output go to the log; -v keeps them here
        options = dataclasses.replace(options, log_file=str(log))
    view = progress.GridView()
    view.line(f"grid {grid.name!r}:")
    for line in pipeline.planned(prepared, grid, options, echo=view.line).lines():
        view.line(line)
    with progress.quiet_logs(log, enabled=not args.verbose), view:
        outcome = pipeline.run_grid(grid, options, stages=tuple(args.stages), prepared=prepared, echo=view.line,
                                    view=view)
    view.line("\n== summary")
    for summary in outcome.summaries:
        view.line(summary.line())
    for cell, reason in outcome.failed:
        view.line(f"FAILED {cell}: {reason}")
    if outcome.timing():
        view.line(outcome.timing())
    view.line(f"MLflow UI: {tracking.ui_url(grid.name)}  (experiment '{grid.name}')")
    if outcome.report_dir:
        view.line(f"report: {outcome.report_dir}/index.html")
    if not args.verbose:
        view.line(f"log: {log}")
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    run_main(main)
