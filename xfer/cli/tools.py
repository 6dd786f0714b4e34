"""`xfer report | serve | stop | bench`: the report, the local MLflow server, and the benchmarks.

    xfer report --experiment smoke             # = python -m reports --experiment smoke
    xfer serve [--root runs] [--port 5000]     # (re)start the runs folder's MLflow server; prints its URL
    xfer stop [--root runs]
    xfer bench                                 # the training loop against the seed's input pipeline
    xfer bench --pack [--json]                 # a trial per cell vs packs (sequential, batched): cells/hour
    xfer bench --gpu-report [--json]           # every GPU measurement in one call (on a GPU), JSON Lines
    xfer bench --transfer                      # glyph-pretrained vs scratch on 500 MNIST-5k digits
    xfer bench --attack                        # PGD generation, examples/s
    xfer bench --score [--targets 8] [--json]  # K targets scoring the same images: one after another vs stacked
    xfer bench --estimate [--n 5000] [--json]  # LEEP, NCE, H-score, LogME: seconds per (model, target) pair
    xfer archs resnet_mini                     # an arch's parameter tensors, numbered as freeze depths
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xfer.errors import XferError


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xfer report", description="Build one experiment's report and say what is missing.")
    p.add_argument("--experiment", required=True, help="MLflow experiment (the grid's name)")
    p.add_argument("--out", type=Path, help="report folder (default: <runs folder>/reports/<experiment>)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report as a `report` run in MLflow")
    return p


def report(argv: list[str]) -> int:
    from reports.build import build_report

    args = report_parser().parse_args(argv)
    result = build_report(args.experiment, args.out, log_to_mlflow=not args.no_mlflow)
    print(f"report of {args.experiment!r}: {len(result.files)} files in {result.out}; open {result.out / 'index.html'}")
    if result.run_id:
        print(f"logged as MLflow run {result.run_id}")
    for line in result.missing:
        print(f"missing: {line}")
    return 0


def server_parser(command: str) -> argparse.ArgumentParser:
    from xfer import server

    p = argparse.ArgumentParser(prog=f"xfer {command}", description=(
        "(Re)start the runs folder's MLflow server, detached, and print its URL." if command == "serve"
        else "Stop the runs folder's MLflow server."))
    p.add_argument("--root", help="runs folder (default: $XFER_RUNS, else ./runs)")
    if command == "serve":
        p.add_argument("--port", type=int, help="default: the last port used, else a free one")
        p.add_argument("--host", default=server.LOOPBACK, help="bind address; 0.0.0.0 on a cluster head so workers reach it")
    return p


def serve(argv: list[str]) -> int:
    from xfer import server

    args = server_parser("serve").parse_args(argv)
    print(server.start_server(args.root, args.port, args.host))
    return 0


def stop(argv: list[str]) -> int:
    from xfer import server

    server.stop_server(server_parser("stop").parse_args(argv).root)
    return 0


def bench_parser() -> argparse.ArgumentParser:
    from xfer import bench, stacked

    cuda = _cuda()
    p = argparse.ArgumentParser(prog="xfer bench", description=bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet_mini")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--target", type=float, default=0.97)
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if cuda else []))
    p.add_argument("--transfer", action="store_true", help="print the transfer figure instead of the pipeline comparison")
    p.add_argument("--sources", nargs="+", default=["glyph_digits", "glyph_letters"])
    p.add_argument("--size", type=int, default=500)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--pretrain-size", type=int, default=5000)
    p.add_argument("--pack", action="store_true", help="a trial per cell against packed trials (cells/hour)")
    p.add_argument("--archs", nargs="+", default=None,
                   help=f"--pack, --score, --estimate: the archs to measure (default --pack: {' '.join(bench.PACK_ARCHS)}; "
                        f"--score: {' '.join(stacked.SCORE_ARCHS)}; --estimate: {' '.join(bench.ESTIMATE_ARCHS)})")
    p.add_argument("--cells", type=int, default=6, help="--pack: cells per arch")
    p.add_argument("--pack-cell-size", type=int, default=1000, help="--pack: training examples per cell")
    p.add_argument("--pack-epochs", type=int, default=1, help="--pack: epochs per cell")
    p.add_argument("--json", action="store_true",
                   help="--pack, --score, --estimate: print the rows as JSON; --gpu-report: one JSON line per section on "
                        "stdout as it ends, the whole report last (the lines for people go to stderr)")
    p.add_argument("--score", action="store_true",
                   help="K targets of one arch scoring the same images, one after another vs as one stacked model "
                        "(target-examples/s)")
    p.add_argument("--targets", type=int, default=8, help="--score: target models per arch")
    p.add_argument("--estimate", action="store_true",
                   help="seconds per (pretrained model, target) pair of each transferability estimator and of the "
                        "forward pass that feeds them, per arch, on --dataset's training images")
    p.add_argument("--gpu-report", action="store_true",
                   help="every GPU measurement in one call, each section on its own (a failure is reported, the rest "
                        "runs): install; the batched model against each cell alone (SGD, freezing, dropout, "
                        "augmentation, resume in fp32, and bf16); batched throughput and peak memory per arch and pack "
                        "size; four packs sharing the device; attack generation; scoring; the seed grid's projected "
                        "hours, attacks counted. Exit status 1 if any part failed")
    p.add_argument("--device", default="cuda", help="--gpu-report: the device (cpu runs the script small, as a check)")
    p.add_argument("--quick", action="store_true", help="--gpu-report: tiny sizes (checks the script, not the GPU)")
    p.add_argument("--sections", nargs="+", default=None, choices=bench.REPORT_SECTIONS, metavar="SECTION",
                   help=f"--gpu-report: only these sections, in the report's order (default: "
                        f"{' '.join(bench.DEFAULT_SECTIONS)})")
    p.add_argument("--paths", action="store_true",
                   help="--gpu-report: also, last, the grid's real path (MLflow, Ray Tune) a trial per cell vs packed "
                        "(cells/hour; mostly trial start-up and MLflow runs, which --pack measures without a GPU)")
    p.add_argument("--attack", action="store_true", help="time PGD generation (examples/s) on CPU and, if present, CUDA")
    p.add_argument("--n", type=int, default=None,
                   help="--attack: examples to generate (default 1000: mnist5k's test split); --score: images to score "
                        "(default 1000); --estimate: target training images (default 5000)")
    p.add_argument("--steps", type=int, default=10, help="--attack: PGD steps")
    return p


def run_bench(argv: list[str]) -> int:
    from xfer import bench, stacked

    args = bench_parser().parse_args(argv)
    echo = (lambda line: print(line, file=sys.stderr)) if args.json else print
    n = args.n or (bench.ESTIMATE_N if args.estimate else 1000)
    if args.gpu_report:
        if args.device == "cuda" and not _cuda():
            raise XferError("--gpu-report needs a CUDA GPU, and torch sees none here; --device cpu --quick checks the "
                            "script itself on this machine.")
        # JSON Lines, flushed as each section ends: a call cut short still leaves every finished section's figures.
        emit = (lambda line: print(json.dumps(line, allow_nan=False), flush=True)) if args.json else None
        sections = args.sections or [*bench.DEFAULT_SECTIONS, *(["paths"] if args.paths else [])]
        result = bench.gpu_report(args.device, args.quick, echo=echo, emit=emit, sections=sections)
        return 1 if result["failed"] else 0
    elif args.pack:
        rows = bench.pack_rows(args.archs or list(bench.PACK_ARCHS), args.cells, args.pack_cell_size, args.pack_epochs,
                               args.devices, echo=echo)
        if args.json:
            print(json.dumps(rows, indent=2))
    elif args.score:
        rows = stacked.bench(args.archs or list(stacked.SCORE_ARCHS), args.targets, n, args.devices, echo=echo)
        if args.json:
            print(json.dumps(rows, indent=2))
    elif args.estimate:
        rows = bench.estimate_rows(args.archs or list(bench.ESTIMATE_ARCHS), n, args.dataset, args.devices, echo=echo)
        if args.json:
            print(json.dumps(rows, indent=2))
    elif args.attack:
        bench.attack_rows(n, args.steps, args.arch, args.devices)
    elif args.transfer:
        print(bench.transfer(args.sources, args.arch, args.size, args.seeds, args.epochs, args.pretrain_epochs,
                             args.pretrain_size))
    else:
        for device in args.devices:
            print(f"\n{args.arch} on {args.dataset}, {args.epochs} epochs, device {device}:")
            print(bench.table(bench.measure(args.dataset, args.arch, args.epochs, device, args.target), args.target))
    return 0


def archs(argv: list[str]) -> int:
    """`xfer archs [NAME ...]`: each arch's parameter tensors with the freeze depth that reaches them."""
    from xfer import models

    p = argparse.ArgumentParser(prog="xfer archs", description="Each arch's parameter tensors, numbered as freeze depths.")
    p.add_argument("names", nargs="*", help=f"archs (default: all): {', '.join(models.list_archs())}")
    for name in p.parse_args(argv).names or models.list_archs():
        shape = (1, 32, 32) if name == "resnet18" else (2, 28, 28) if name.startswith("adder_") else (1, 28, 28)
        print(models.describe(name, shape), end="\n\n")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


__all__ = ["report", "serve", "stop", "run_bench", "archs"]
