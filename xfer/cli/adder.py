"""The two-digit adder: two digit images in, their sum out; transfer from a pretrained digit classifier vs scratch.

    python sweeps/adder.py                          # embedded MNIST-5k, sizes × seeds, every variant  [= xfer adder]
    python sweeps/adder.py --smoke                  # the same path in well under a minute on a CPU
    python sweeps/adder.py --dataset mnist --sizes 1000 10000 50000 --seeds 0 1 2 3 4

Variants: `transfer` (the seed's: the classifier's 10 + 10 logits → 19 → 19), `transfer_features` (its
penultimate features under the scratch arm's head) and `scratch` (a CNN per digit). The digit classifier (one
pretrain cell per seed) is found in MLflow by its key or trained first; then the (variant, size, seed) cells
train in packs of Ray Tune trials, each recorded in MLflow under stage "adder". Last, the experiment's report
is built: per size, one figure of the variants' error curves (against iterations and seconds) and verdicts on
"transfer beats scratch" with 95% paired-t intervals over seeds.
Data: the embedded MNIST-5k (5,000 real MNIST digits, no files, no network) unless --dataset mnist.
Ray: RAY_ADDRESS / --address joins a cluster, else Ray starts locally.
MLflow: MLFLOW_TRACKING_URI is used as is, else a local server on 127.0.0.1 keeps the runs under ./runs.
"""

from __future__ import annotations

import argparse

from xfer.cli import add_cluster_flags, add_data_flags, add_run_flags, run_options

# --smoke: the real path (pretrain cell, every variant, Tune, MLflow) on tiny data; the numbers mean nothing.
SMOKE = dict(sizes=[200], seeds=[0], epochs=2, pretrain_epochs=1, pretrain_size=500, val_digits=200,
             val_pairs=100, test_pairs=200)


def parser() -> argparse.ArgumentParser:
    from xfer import adder
    from xfer.specs import TrainSpec

    p = argparse.ArgumentParser(prog="sweeps/adder.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[1000, 5000, 20000], help="training pairs per cell")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10, help="adder training epochs (every variant)")
    p.add_argument("--variants", nargs="+", default=list(adder.VARIANTS), metavar="VARIANT",
                   help=f"arms to train: {', '.join(adder.VARIANTS)} (default: all)")
    p.add_argument("--dataset", default="mnist5k", help="digit dataset: mnist5k (embedded) or mnist (torchvision files)")
    p.add_argument("--digit-arch", default="resnet_mini", help="architecture of the pretrained digit classifier "
                                                               "(digit_cnn: the scratch arm's CNN)")
    p.add_argument("--pretrain-epochs", type=int, default=TrainSpec.epochs)
    p.add_argument("--pretrain-size", type=int, default=None, help="digits to pretrain on (default: the whole pool)")
    p.add_argument("--val-digits", type=int, default=TrainSpec.val_size, help="train-pool digits held out for validation pairs")
    p.add_argument("--val-pairs", type=int, default=1000)
    p.add_argument("--test-pairs", type=int, default=5000)
    p.add_argument("--experiment", default="adder", help="MLflow experiment name")
    add_data_flags(p)
    add_cluster_flags(p)
    add_run_flags(p)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1-2 epochs: the whole path in well under a minute")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.smoke:  # smoke values become the defaults; flags given explicitly still win
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    # Imported after parsing, so that --help and a mistyped flag answer at once, without loading MLflow.
    from reports import build_report
    from reports.verdicts import ADDER_CLAIM
    from xfer import adder, data, names, progress, server, tracking

    cells = adder.cells(
        args.sizes, args.seeds, dataset=args.dataset, digit_arch=args.digit_arch, pretrain_epochs=args.pretrain_epochs,
        pretrain_size=args.pretrain_size, val_digits=args.val_digits, epochs=args.epochs, val_pairs=args.val_pairs,
        test_pairs=args.test_pairs, variants=args.variants,
    )
    dataset = data.load(args.dataset, args.data_root, args.download)
    adder.check(cells, dataset)  # bad sizes or data fail here, before Ray and MLflow start
    server.ensure_server()
    log = progress.log_path(args.experiment)
    options = run_options(args, args.experiment, log_file=None if args.verbose else str(log))
    with progress.quiet_logs(log, enabled=not args.verbose), progress.GridView() as view:
        summaries = adder.run_stage(cells, options, {dataset.name: dataset}, view)
    print("\n== summary")
    for summary in summaries:
        print(summary.line())
    failed = [f for s in summaries for f in s.failed]
    for cell, reason in failed:
        print(f"FAILED {cell}: {reason}")
    report = build_report(args.experiment)
    for path in report.files:
        if path.suffix == ".png" and path.stem.startswith("curves_adder_"):
            print(f"figure: {path}")
    for line in report.verdicts.loc[report.verdicts["claim"] == ADDER_CLAIM, "line"]:
        print(f"verdict: {line}")
    if report.at_chance is not None:
        for row in report.at_chance[report.at_chance["stage"] == names.ADDER].itertuples():
            print(f"at chance, left out of the verdicts: adder {row.label} (test accuracy {row.test_acc:.1%})")
    print(f"report: {report.out / 'index.html'}")
    print(f"MLflow UI: {tracking.ui_url(args.experiment)}  (experiment '{args.experiment}')")
    return 1 if failed else 0


__all__ = ["parser", "main", "SMOKE"]
