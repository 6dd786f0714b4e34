"""The main job: the whole transfer study (pretrain → fine-tune/scratch → adder → attack → report) on Ray Tune.

    python sweeps/full_grid.py                  # the seed experiment (needs its torchvision data)   [= xfer grid]
    python sweeps/full_grid.py --preset smoke   # embedded offline data, minutes on a laptop CPU
    python sweeps/full_grid.py --preset claims  # every seed claim as a verdict, embedded data
    python sweeps/full_grid.py --dry-run --gpus 4          # the plan and its cost; the data need not be here
    python sweeps/full_grid.py --fast-dev-run   # every cell on one batch, end to end: will the grid run?
    python sweeps/full_grid.py --preset cifar10  # a target's grid file from sweeps/presets/ (see --preset)
    python sweeps/full_grid.py --preset lenet --recipes plain head10x_sgd unfreeze --unfreeze-epoch 4

Every grid setting is a flag here (its type, default and help come from xfer.grid.Grid), applied over the preset
and the --grid file. Ray: RAY_ADDRESS / --address joins a cluster (`ray up cluster.yaml`), else Ray starts
locally, and only once a stage has work. MLflow: MLFLOW_TRACKING_URI is used as is, else a local server on
127.0.0.1 keeps the runs under ./runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from xfer import grid as grids
from xfer.errors import XferError
from xfer.cli import add_cluster_flags, add_data_flags, add_run_flags, run_options

# Grid settings that are not a plain --flag VALUE: how the command line sets them instead.
_SPECIAL = {"freeze", "tuned", "adder", "only", "scratch", "augment", "fast_dev_run"}


def parser() -> argparse.ArgumentParser:
    from xfer import packs, pipeline, server

    p = argparse.ArgumentParser(prog="sweeps/full_grid.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seed", choices=grids.list_presets(), metavar="NAME",
                   help=f"base grid (default: seed): {', '.join(grids.list_presets())}; built-ins are "
                        f"{', '.join(grids.PRESETS)}, the others are the grid files in sweeps/presets/")
    p.add_argument("--grid", type=Path, help="YAML or TOML file of grid settings, applied over the preset")
    settings = p.add_argument_group("grid settings (over the preset and --grid; defaults: the seed experiment's)")
    for f in dataclasses.fields(grids.Grid):
        if f.name in _SPECIAL:
            continue
        kind, many = grids.setting_type(f.name)
        settings.add_argument(grids.flag(f.name), dest=f.name, type=kind, nargs="+" if many else None,
                              help=f.metadata.get("help"))
    settings.add_argument("--freeze", nargs="+", help=grids.Grid.__dataclass_fields__["freeze"].metadata["help"])
    settings.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                          help=grids.Grid.__dataclass_fields__["augment"].metadata["help"] + " (default: the preset's)")
    settings.add_argument("--no-scratch", action="store_true", help="skip the scratch baselines")
    p.add_argument("--fast-dev-run", action="store_true",
                   help="rehearse the whole grid before paying for it: every cell through the real path (Ray, packs, "
                        "MLflow, checkpoints, adversarial sets, scores, report) on one batch, absent datasets stood in "
                        "for by synthetic ones of their published shape, into the experiment <name>-fast-dev-run")
    add_data_flags(p)
    p.add_argument("--skip-bad-images", action="store_true",
                   help="image folders: leave unreadable files out (listed in the summary and in MLflow) instead of stopping")
    add_cluster_flags(p)
    p.add_argument("--workers-per-trial", type=int, default=1, help="data-parallel Ray Train workers per trial")
    p.add_argument("--vectorise", choices=packs.VECTORISE, default="auto",
                   help="train a pack's cells as one batched model: auto (on a GPU, and on a CPU where it measures "
                        "faster), always (wherever it can), never")
    p.add_argument("--checkpoint-every", type=float, default=packs.CHECKPOINT_INTERVAL_S, metavar="SECONDS",
                   help="hand a pack's epoch states to Tune at most this often (a killed pack loses at most this much)")
    p.add_argument("--stages", nargs="+", default=list(pipeline.STAGE_ORDER), choices=pipeline.STAGE_ORDER)
    p.add_argument("--tuned", action="store_true", help="use the best Optuna configuration per (arch, size) from MLflow")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan: each stage's cells, what MLflow has, packs and an estimate of the wall time "
                        "(the data need not be here); run nothing")
    p.add_argument("--gpus", type=int, default=0, metavar="G", help="--dry-run: estimate the wall time on G GPUs too")
    p.add_argument("--mlflow-patience", type=float, default=server.PATIENCE_S, metavar="SECONDS",
                   help="a tracking server xfer did not start (MLFLOW_TRACKING_URI) unreachable this long stops the grid "
                        "cleanly (the runs folder's own server is restarted instead)")
    add_run_flags(p)
    return p


def grid_from_args(args: argparse.Namespace) -> grids.Grid:
    """The preset, then the --grid file, then every flag given."""
    values = grids.preset_values(args.preset)
    if args.grid:
        values.update(grids.load_file(args.grid))
    for f in dataclasses.fields(grids.Grid):
        if f.name not in _SPECIAL - {"freeze", "augment"} and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    if args.no_scratch:
        values["scratch"] = False
    if args.archs is not None and args.freeze is None:
        # --archs picks some of the preset's archs: its freeze depths for the others no longer apply.
        freeze = grids.parse_freeze(values.get("freeze", grids.Grid().freeze))
        values["freeze"] = {arch: depths for arch, depths in freeze.items() if arch in args.archs or arch == "*"}
    grid = grids.make(**values)
    return grids.fast_dev_run(grid) if args.fast_dev_run or grid.fast_dev_run else grid


def main(argv: list[str] | None = None) -> int:
    from xfer import pipeline, progress, server, stopping, tracking

    args = parser().parse_args(argv)
    if not args.mlflow_patience > 0:
        raise XferError(f"--mlflow-patience {args.mlflow_patience:g}: it is how many seconds an unreachable tracking "
                        "server is waited for, so it must be more than 0 (default "
                        f"{server.PATIENCE_S:.0f}). Nothing was launched.")
    grid = grid_from_args(args)
    options = run_options(args, grid.name, skip_bad_images=args.skip_bad_images, workers_per_trial=args.workers_per_trial,
                          checkpoint_interval_s=args.checkpoint_every, vectorise=args.vectorise)
    if args.tuned:
        from xfer import tuned

        grids.validate(grid)   # a bad grid is refused before the tuning look-up starts the MLflow server
        server.ensure_server()
        grid = tuned.apply_best(grid, echo=print)
    if args.dry_run:   # the plan and its cost, with or without the data; starts no Ray and no trial
        pipeline.dry_run(grid, options, gpus=args.gpus, only=tuple(args.stages))
        return 0
    prepared = pipeline.prepare(grid, options)   # every refusal happens here: no MLflow server, no Ray yet
    server.ensure_server()
    log = progress.log_path(grid.name)
    if not args.verbose:   # Ray's banners, Tune's tables and worker output go to the log; -v keeps them here
        options = dataclasses.replace(options, log_file=str(log))
    view = progress.GridView()
    view.line(f"grid {grid.name!r}:")
    if pipeline.stand_in_note(prepared):
        view.line(pipeline.stand_in_note(prepared))
    listed = pipeline.snapshot(options)   # one listing of MLflow answers the plan and every stage until one runs
    only = tuple(args.stages)
    for line in pipeline.planned(prepared, grid, options, echo=view.line, listed=listed, only=only).lines():
        view.line(line)
    # Ctrl-C / SIGTERM stop the grid cleanly (a second stops at once); the tracking server is watched throughout.
    with progress.quiet_logs(log, enabled=not args.verbose), view, stopping.Stop(view.line) as stop, \
            server.Watch(view.line, on_lost=stop.trigger, patience_s=args.mlflow_patience):
        outcome = pipeline.run_grid(grid, options, only=only, prepared=prepared, echo=view.line,
                                    view=view, listed=listed)
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
    if outcome.stopped:
        stopped = sum(s.stopped for s in outcome.summaries)
        view.line(f"stopped ({outcome.stopped}): {stopped} cell(s) left resumable or not started; no later stage and no "
                  f"report ran. Go on with the same command: {shlex.join(['python', 'sweeps/full_grid.py', *(argv or sys.argv[1:])])}")
        return stop.exit_code
    return 1 if outcome.failed else 0


__all__ = ["parser", "grid_from_args", "main"]
