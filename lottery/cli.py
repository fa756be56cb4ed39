"""``python -m lottery``: every step of the experiment by hand (or from SLURM, cron, a notebook).

    python -m lottery fetch fashion-mnist --out data/fashion-mnist-images
    python -m lottery replicates --config cfg.json --data DATA_DIR --root R   (the work dir of each replicate)
    python -m lottery dense --config cfg.json --data DATA_DIR --workdir W [--replicate K]
    python -m lottery masks --workdir W
    python -m lottery retrain --workdir W --mask 3 --rewind 1ep [--control random_prune]
    python -m lottery retrain --workdir W --mask 0,3,7 --rewind 1ep [--pack N]   (or --mask all)
    python -m lottery imp --workdir W --rewind 1ep [--levels K]   (iterative pruning: one chain)
    python -m lottery stability --workdir W --rewind 1ep [--mask 3] [--points 11] [--copy a|b]   (instability analysis)
    python -m lottery summarize --workdir W        (W: a work directory, or a replicate set's directory)
    python -m lottery report --workdir W           (results.csv, the plot, report.md; a set: mean ± std, summary.csv)
    python -m lottery report --compare W1 W2 ... --out DIR [--rewind 0it,1ep]   (one plot and table of several experiments)
    python -m lottery input-bench --data DATA_DIR [--augmentation random_resized_crop] [--model resnet50]
    python -m lottery rerun-failed --run-id RUN_ID [--run-id ...] | --since 2026-12-01 [--until ...] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lottery import input_bench
from lottery.deploy import rerun
from lottery.config import CONTROLS, ConfigError, ExperimentConfig
from lottery.errors import LotteryError

log = logging.getLogger("lottery")


def _load_config(path: str | None, overrides: list[str]) -> dict:
    conf = {}
    if path:
        try:
            conf = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise LotteryError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise LotteryError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(conf, dict):
            raise LotteryError(f"config file {path} must hold a JSON object")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise LotteryError(f"--set {item!r}: expected KEY=VALUE")
        try:
            conf[key] = json.loads(value)
        except json.JSONDecodeError:
            conf[key] = value  # a bare string such as --set model=conv4
    return conf


def _threads(args) -> int | None:
    return args.threads or (int(os.environ["LOTTERY_THREADS"]) if os.environ.get("LOTTERY_THREADS") else None)


def cmd_fetch(args) -> None:
    from lottery.data.fetch import export_fashion_mnist

    summary = export_fashion_mnist(args.out, limit=args.limit, progress=True)
    print(json.dumps(summary, indent=2, default=str))


def _config(args) -> ExperimentConfig:
    return ExperimentConfig.from_dict(_load_config(args.config, args.set))


def cmd_id(args) -> None:
    from lottery.paths import Workdir

    print(Workdir.for_experiment(args.root, _config(args), args.data).name)


def cmd_replicates(args) -> None:
    from lottery.paths import prepare_replicates

    replicate_set, workdirs = prepare_replicates(args.root, _config(args), args.data)
    print(json.dumps({"replicate_set": str(replicate_set) if replicate_set else None, "workdirs": [str(w) for w in workdirs]}, indent=2))


def cmd_dense(args) -> None:
    from lottery.dense import run_dense
    from lottery.paths import Workdir

    cfg = _config(args).replicate(args.replicate)
    workdir = args.workdir or Workdir.for_experiment(args.root, cfg, args.data)
    result = run_dense(cfg, args.data, workdir, threads=_threads(args), progress=sys.stdout.isatty())
    print(json.dumps(result, indent=2, default=str))


def cmd_masks(args) -> None:
    from lottery.masks import make_masks

    for d in make_masks(args.workdir):
        print(f"{d['index']:3d}  {d['mask_id']}  sparsity {100 * d['sparsity']:6.2f}%  left {100 * d['remaining']:6.2f}%")


def cmd_retrain(args) -> None:
    from lottery.late_reset import retrain

    group = args.mask == "all" or "," in args.mask
    masks = "all" if args.mask == "all" else [m.strip() for m in args.mask.split(",")]
    controls = [c.strip() for c in args.control.split(",")] if args.control else None
    results = retrain(args.workdir, masks, args.rewind, control=controls, threads=_threads(args),
                      data_dir=args.data, progress=sys.stdout.isatty(), pack=args.pack)
    print(json.dumps(results if group else results[0], indent=2, default=str))


def cmd_imp(args) -> None:
    from lottery.imp import run_chain

    results = run_chain(args.workdir, args.rewind, levels=args.levels, threads=_threads(args), data_dir=args.data,
                        progress=sys.stdout.isatty())
    print(json.dumps(results, indent=2, default=str))


def cmd_stability(args) -> None:
    from lottery.stability import DEFAULT_POINTS, run_stability, train_copy

    common = dict(mask=args.mask, threads=_threads(args), data_dir=args.data, progress=sys.stdout.isatty())
    if args.copy:
        result = train_copy(args.workdir, args.rewind, args.copy, **common)
    else:
        result = run_stability(args.workdir, args.rewind, points=DEFAULT_POINTS if args.points is None else args.points, **common)
    print(json.dumps(result, indent=2, default=str))


def cmd_summarize(args) -> None:
    from lottery.paths import ReplicateSet, Workdir
    from lottery.report import format_table, summarize

    rows = summarize(args.workdir)
    print(format_table(args.workdir, rows))
    if ReplicateSet.holds_set(args.workdir):
        print(f"\nwrote {ReplicateSet(args.workdir).results_csv} and {ReplicateSet(args.workdir).summary_csv}")
    else:
        print(f"\nwrote {Workdir(args.workdir).results_csv}")


def cmd_report(args) -> None:
    from lottery import report

    if args.compare:
        if args.out is None:
            raise ValueError("--compare needs --out DIR (where comparison.png and comparison.md are written)")
        rewinds = [r.strip() for r in args.rewind.split(",")] if args.rewind else None
        paths = report.compare(args.compare, args.out, rewinds=rewinds)
    else:
        paths = report.write_report(args.workdir)
    print(json.dumps(paths, indent=2, default=str))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lottery", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="write a bundled data set as an ImageNet-layout image folder")
    p.add_argument("dataset", choices=["fashion-mnist"])
    p.add_argument("--out", required=True, help="output folder (train/<class>/*.png, val/<class>/*.png)")
    p.add_argument("--limit", type=int, help="keep the first N images of each split")
    p.set_defaults(func=cmd_fetch)

    def experiment_args(p, *, workdir_required: bool) -> None:
        p.add_argument("--config", help="experiment config (JSON object); missing fields take their defaults")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (JSON value)")
        p.add_argument("--data", required=True, help="data directory written by the preprocessing job (manifest.json + shards)")
        group = p.add_mutually_exclusive_group(required=workdir_required)
        group.add_argument("--workdir", type=Path, help="the experiment's work directory")
        group.add_argument("--root", type=Path, help="artifact root: the work directory is ROOT/<experiment id>")

    def workdir_command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--workdir", type=Path, required=True, help="the experiment's work directory")
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("id", help="print the experiment id of a config and data set")
    experiment_args(p, workdir_required=False)
    p.set_defaults(func=cmd_id, root=Path("."))

    p = sub.add_parser("replicates", help="prepare the work directory of every replicate, and their replicate set; print them")
    experiment_args(p, workdir_required=False)
    p.set_defaults(func=cmd_replicates, root=Path("."))

    p = sub.add_parser("dense", help="train the dense network, saving rewind checkpoints and the final weights")
    experiment_args(p, workdir_required=True)
    p.add_argument("--replicate", type=int, default=0, help="which replicate (0-based: seed + K) of a config with replicates")
    p.add_argument("--threads", type=int, help="TensorFlow threads (default: all cores; env LOTTERY_THREADS)")
    p.set_defaults(func=cmd_dense)

    workdir_command("masks", "magnitude-prune the final dense weights at every sparsity level", cmd_masks)

    _training_commands(workdir_command)
    _stability_command(workdir_command)
    workdir_command("summarize", "print the accuracy table and write results.csv (a replicate set: and summary.csv)",
                    cmd_summarize)
    _report_command(sub)

    p = sub.add_parser("rerun-failed", help="re-run the failed tickets of finished runs (Airflow's Clear only failed tasks)")
    rerun.add_arguments(p).set_defaults(func=rerun.run)

    p = sub.add_parser("input-bench", help="measure the input stream's img/s (and a model's train-step rate with --model)")
    input_bench.add_arguments(p).set_defaults(func=input_bench.run)
    return parser


def _report_command(sub) -> None:
    p = sub.add_parser("report", help="write results.csv, accuracy_vs_sparsity.png and report.md of a work directory or "
                                      "replicate set; or compare experiments in one plot and table")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--workdir", type=Path, help="an experiment's work directory, or a replicate set's directory "
                                                    "(the report over its replicates: mean ± std)")
    group.add_argument("--compare", nargs="+", type=Path, metavar="W", help="two or more work directories or replicate "
                       "sets of the same data set and model: DIR/comparison.png and DIR/comparison.md")
    p.add_argument("--out", type=Path, metavar="DIR", help="with --compare: where the comparison is written")
    p.add_argument("--rewind", help="with --compare: only these rewind points, comma-separated (default: every one)")
    p.set_defaults(func=cmd_report)


def _training_commands(workdir_command) -> None:
    """The subcommands that retrain tickets: ``retrain`` (one-shot tickets and controls) and ``imp`` (a chain)."""
    for name, help, func in (("retrain", "late reset: retrain (mask, rewind point) tickets or controls, in one process", cmd_retrain),
                             ("imp", "iterative pruning: run or resume the chain of levels of one rewind point", cmd_imp)):
        p = workdir_command(name, help, func)
        p.add_argument("--rewind", required=True, help="rewind point index (0-based) or step such as 1ep")
        p.add_argument("--data", help="data directory (default: the one the dense run used)")
        p.add_argument("--threads", type=int, help="TensorFlow threads (default: all cores; env LOTTERY_THREADS)")
        if name == "imp":
            p.add_argument("--levels", type=int, help="run the chain up to this level (1-based; default: every level)")
            continue
        p.add_argument("--mask", required=True,
                       help="mask index (0-based) or id such as sp20.000; several, comma-separated (0,3,7), or 'all'")
        p.add_argument("--control", help=f"run a random control instead of the tickets: {', '.join(CONTROLS)}")
        p.add_argument("--pack", type=int, help="tickets trained side by side (JAX backend; default: env LOTTERY_PACK, "
                                                 "else from the accelerator's memory, 1 on CPU)")


def _stability_command(workdir_command) -> None:
    p = workdir_command("stability", "instability analysis: two copies from a rewind point with different data orders, "
                                     "the error along the line between them", cmd_stability)
    p.add_argument("--rewind", required=True, help="rewind point index (0-based) or step such as 1ep")
    p.add_argument("--mask", help="a ticket's mask: index (0-based) or id such as sp20.000 (default: the dense network)")
    p.add_argument("--points", type=int, help="networks evaluated on the line, endpoints included (at least 3; default 11)")
    p.add_argument("--copy", choices=["a", "b"], help="train this copy only (run again without --copy for the path)")
    p.add_argument("--data", help="data directory (default: the one the dense run used)")
    p.add_argument("--threads", type=int, help="TensorFlow threads (default: all cores; env LOTTERY_THREADS)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.func(args) or 0
    except (ConfigError, LotteryError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
