"""The ``dsimagenet`` command line: subcommands that parse arguments and call one function each.

    dsimagenet classes --order sorted | head -n 2
    python -m dsimagenet --help
"""

from __future__ import annotations

import argparse
import csv
import sys


def _classes(args: argparse.Namespace) -> int:
    from dsimagenet.labels import IMAGENET

    rows = IMAGENET.table(args.order)
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["index", "wnid", "devkit_id", "name"])
        writer.writerows((c.index, c.wnid, c.devkit_id, c.name) for c in rows)
    else:
        print(f"{'index':>5}  {'wnid':<9}  {'devkit_id':>9}  name")
        for c in rows:
            print(f"{c.index:>5}  {c.wnid:<9}  {c.devkit_id:>9}  {c.name}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from dsimagenet.convert import convert

    counts = convert(args.src, args.out, args.formats.split(","), args.src_format)
    print(f"wrote {args.out} ({args.formats}): " + ", ".join(f"{k} {v:,} images" for k, v in counts.items()))
    return 0


def _info(args: argparse.Namespace) -> int:
    import json

    from dsimagenet.convert import describe

    info = describe(args.path, check=args.verify)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            print(f"{k:>16}: {v}")
    bad = isinstance(info.get("checksums"), list)
    return 1 if bad else 0


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=(), only_given: bool = False) -> None:
    """One flag per field of the dataclass ``cls`` (--batch-size for batch_size), its type, choices and help
    from the field's declaration (dsimagenet.fields). ``only_given``: flags not on the command line stay out of
    the namespace (a sweep's base)."""
    import dataclasses
    import typing

    from dsimagenet.fields import choices, field_types, flag, help_text

    types_, choices_, help_ = field_types(cls), choices(cls), help_text(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        base = types_[f.name]
        kwargs: dict = {"help": help_[f.name]}
        if only_given:
            kwargs["default"] = argparse.SUPPRESS
        elif f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            if "default" not in kwargs["help"]:  # a help that says its default says it better
                kwargs["help"] += f" (default: {f.default})"
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:
            kwargs.update(type=typing.get_args(base)[0], nargs="*")
        else:
            kwargs["type"] = base
            if f.name in choices_:
                kwargs["choices"] = choices_[f.name]
        parser.add_argument(flag(f.name), **kwargs)


def config_from_args(cls, args: argparse.Namespace):
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for k, v in values.items():  # list flags take "a b" and "a,b" alike: --formats pickle,native
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            values[k] = tuple(y for x in v for y in x.split(",") if y)
    return cls(**values)


def _train(args: argparse.Namespace) -> int:
    from dsimagenet.train import TrainConfig, train

    result = train(config_from_args(TrainConfig, args), resume=args.resume)
    if result:
        print(f"{args.out}: top-1 error {result['top1_error']:.2f}%, top-5 error {result['top5_error']:.2f}%, "
              f"{result['train_images_per_s']:,.0f} images/s")
    return 0


def _build(args: argparse.Namespace) -> int:
    from dsimagenet.build import BuildConfig, build

    build(config_from_args(BuildConfig, args))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import dataclasses

    from dsimagenet.recipe import TrainConfig
    from dsimagenet.sweep import SweepConfig, kind, load_spec, merge_grids, parse_grid, summary, sweep

    grid, base = load_spec(args.spec) if args.spec else ({}, {})
    if args.grid:
        grid = merge_grids(grid, parse_grid(args.grid), args.spec)
    base.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name != "out" and hasattr(args, f.name)})  # flags override the spec's base; --out is the sweep's
    outcome = sweep(SweepConfig(out=args.out, grid=grid, base=base, jobs=args.jobs, index=args.index, of=args.of,
                                storage=args.storage, gpus=args.gpus, runs_per_gpu=args.runs_per_gpu))
    print(f"{args.out}: {summary(outcome)}; results in {args.out}/results.csv")
    failed = {n: v for n, v in outcome.items() if kind(v) == "failed"}
    for name, what in failed.items():
        print(f"dsimagenet sweep: error: {name}: {what}", file=sys.stderr)
    return 1 if failed else 0  # a diverged run is a result of its settings (a learning rate too high), not a fault


def _report(args: argparse.Namespace) -> int:
    from dsimagenet.report import report

    written = report(args.runs, args.out)
    print(f"{args.out}: " + ", ".join(sorted(written)) + f"; open {written['index.html']}")
    if "excluded.csv" in written:  # diverged, unfinished or damaged runs: said, never silently left out
        with open(written["excluded.csv"], newline="") as f:
            for row in csv.DictReader(f):
                print(f"  not in the report: {row['run']}: {row['status']}: {row['why']}")
    return 0


TUNE_OWN = ("out", "data", "epochs", "lr", "width", "weight_decay", "seed")


def _tune(args: argparse.Namespace) -> int:
    import dataclasses

    from dsimagenet.recipe import TrainConfig
    from dsimagenet.tune import TuneConfig, tune

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TuneConfig) if f.name != "base"}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    base = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name not in TUNE_OWN and hasattr(args, f.name)}
    s = tune(TuneConfig(**values, base=base))
    best = s["best"]
    print(f"{args.out}: {s['trials']} trials ({s['complete']} complete, {s['pruned']} pruned, {s['diverged']} "
          "diverged); best: "
          + (f"trial {best['number']}, top-1 error {best['top1_error']:.2f}%, {best['params']}" if best else "none")
          + f"; storage {s['storage']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dsimagenet.demo import DemoConfig, demo

    try:
        demo(DemoConfig(out=args.out, epochs=args.epochs))
    except RuntimeError as e:
        print(f"dsimagenet demo: FAILED: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dsimagenet import __version__

    parser = argparse.ArgumentParser(
        prog="dsimagenet", description="Downsampled ImageNet: build, load, train, experiment.")
    parser.add_argument("--version", action="version", version=f"dsimagenet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_data_commands(sub)
    _add_experiment_commands(sub)
    return parser


def _add_data_commands(sub) -> None:
    """classes, convert, info, build."""
    p = sub.add_parser("classes", help="print the 1000 ILSVRC-2012 classes",
                       description="Print the class table: 0-based label, WNID, devkit ID, name.")
    p.add_argument("--order", choices=["devkit", "sorted"], default="devkit",
                   help="devkit: the official files' order (kit fox first); sorted: torchvision's (tench first)")
    p.add_argument("--csv", action="store_true", help="comma-separated, with a header")
    p.set_defaults(func=_classes)

    p = sub.add_parser("convert", help="convert a dataset between official pickle, npz and native formats",
                       description="Stream SRC (a folder of official pickles or npz, their zips, or a native "
                                   "dataset) into OUT, one batch file at a time.")
    p.add_argument("src", help="dataset folder or official zip")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--formats", default="native", help="comma-separated: native,pickle,npz (default native)")
    p.add_argument("--src-format", choices=["native", "pickle", "npz"],
                   help="which files of SRC to read when it holds several formats")
    p.set_defaults(func=_convert)

    p = sub.add_parser("info", help="describe a dataset: format, size, splits, counts, classes, mean",
                       description="Print what a dataset is; --verify also checks its sha256 checksums "
                                   "(native) or reads every batch file (official).")
    p.add_argument("path")
    p.add_argument("--verify", action="store_true", help="recompute checksums; exit 1 if any fails")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)

    from dsimagenet.build import BuildConfig

    p = sub.add_parser("build", help="build downsampled datasets from ILSVRC-2012 or a class-folder tree",
                       description="Decode every image once, resize it to every --sizes x --methods exactly as "
                                   "Pillow does, and write OUT/<size>_<method>/ in the official format and/or "
                                   "the native one. Resumable: run the same command again after an interruption.")
    add_config_arguments(p, BuildConfig)
    p.set_defaults(func=_build)


def _add_experiment_commands(sub) -> None:
    """train, sweep, report, tune, demo."""
    from dsimagenet.recipe import TrainConfig

    p = sub.add_parser("train", help="train a Wide ResNet with the paper's recipe",
                       description="Train WRN-N-k on a downsampled ImageNet with the paper's recipe (SGD, momentum "
                                   "0.9, batch 128, lr 0.01 x0.2 after epochs 10/20/30, 40 epochs). Run with "
                                   "torchrun --nproc_per_node=K -m dsimagenet train ... for several GPUs.")
    add_config_arguments(p, TrainConfig)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (or start it if there is none)")
    p.set_defaults(func=_train)

    p = sub.add_parser("sweep", help="run a grid of training runs",
                       description="Run every combination of --grid (and/or a YAML spec with 'grid' and 'base'), "
                                   "with the train flags given here as the base (they override the spec's base); one "
                                   "run directory each under --out. Finished runs are skipped, interrupted ones "
                                   "resumed, diverged ones kept as diverged; a run is never run twice. Runs made "
                                   "before with other settings are refused, except more --epochs of a step or sgdr "
                                   "schedule, which continue them. A run that fails is recorded in results.csv and "
                                   "the others go on; the exit status is then 1.")
    p.add_argument("spec", nargs="?", help="YAML file: grid: {name: [values]}, base: {train flags}")
    p.add_argument("--grid", help='e.g. "method=box,nearest lr=0.001,0.01 width=1,2 size=16,32 seed=0,1"')
    p.add_argument("--out", required=True, help="the sweep directory")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time on this machine (default: one a GPU slot, see --runs-per-gpu; 1 on the CPU)")
    p.add_argument("--gpus", help="GPUs of this machine to spread the runs over, e.g. 0,1,2,3 (default: every "
                                  "visible one, when the runs train on CUDA)")
    p.add_argument("--runs-per-gpu", type=int, default=None,
                   help="runs sharing one GPU at a time (default: one, or --jobs spread over the GPUs)")
    p.add_argument("--index", type=int, default=0, help="this worker's index in a job array (0-based)")
    p.add_argument("--of", type=int, default=1, help="the number of workers in the job array")
    p.add_argument("--storage", help="an Optuna storage URL (or journal:PATH) that workers on any machine share: "
                                     "each takes the next run nobody has started")
    add_config_arguments(p, TrainConfig, skip=("out",), only_given=True)
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="the paper's tables and figures from runs, and an HTML page",
                       description="Table 1 (Markdown, CSV, LaTeX) beside the paper's, learning-rate rank "
                                   "correlations, Figs. 1-7 as the runs allow, and a self-contained index.html.")
    p.add_argument("runs", nargs="+", help="run directories or folders holding them")
    p.add_argument("--out", required=True, help="report folder")
    p.set_defaults(func=_report)

    from dsimagenet.tune import TuneConfig

    p = sub.add_parser("tune", help="multi-fidelity hyperparameter search (Optuna, Hyperband over epochs)",
                       description="Search learning rate, width, weight decay and (with --sizes) resolution with "
                                   "Optuna's TPE sampler and Hyperband pruner, epochs as the fidelity. The study "
                                   "lives in --storage (default OUT/study.db): rerun to continue it; point workers "
                                   "on other machines at the same storage to share it.")
    add_config_arguments(p, TuneConfig, skip=("base",))
    add_config_arguments(p, TrainConfig, skip=TUNE_OWN, only_given=True)
    p.set_defaults(func=_tune)

    p = sub.add_parser("demo", help="run the whole flow offline on a built-in example",
                       description="Write a small synthetic ILSVRC-2012 release in the real layout, build it at "
                                   "16 and 32 px with box and nearest, train WRN-20-1 on it and check that it is "
                                   "far above chance.")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--epochs", type=int, default=6)
    p.set_defaults(func=_demo)


def main(argv: list[str] | None = None) -> int:
    from dsimagenet.errors import DSImageNetError, describe_os_error

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `dsimagenet classes | head` closes the pipe early; that is not an error
        sys.stderr.close()
        return 0
    except DSImageNetError as e:  # bad input or environment: one line naming the file, its own exit status
        print(f"dsimagenet {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the system's word on a path (missing, unreadable, disk full): one line naming it
        print(f"dsimagenet {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: what was done is kept (builds, runs, sweeps resume)
        print(f"dsimagenet {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)  # runs.Interrupted says where
        return getattr(e, "exit_code", 130)  # 128 + the signal
    # Anything else is a bug of ours and keeps its traceback.


if __name__ == "__main__":
    sys.exit(main())
