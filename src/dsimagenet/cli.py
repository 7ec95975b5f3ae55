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

    counts = convert(args.src, args.out, args.formats.split(","), args.src_format, quiet=args.quiet,
                     labels_in=args.labels_in)
    from dsimagenet.runs import plural

    print(f"wrote {args.out} ({args.formats}): " + ", ".join(f"{k} {plural(v, 'image')}" for k, v in counts.items()))
    return 0


def _info(args: argparse.Namespace) -> int:
    import json

    from dsimagenet.convert import describe

    info = info_document(describe(args.path, check=args.verify, labels_in=args.labels_in))
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print("\n".join(info_lines(info)))
    bad = isinstance(info.get("checksums"), list)
    return 1 if bad else 0


def info_document(info: dict) -> dict:
    """``describe``'s dict as one JSON document: a value stored as JSON text (a native dataset's ``source``, as
    the build records it) is decoded into the document rather than nested in it as a string."""
    import json

    out = {}
    for k, v in info.items():
        if isinstance(v, str) and v[:1] in "{[":
            try:
                v = json.loads(v)
            except ValueError:  # a path that starts with a bracket: text after all
                pass
        out[k] = info_document(v) if isinstance(v, dict) else v  # at any depth (provenance repeats the source)
    return out


def _plain(value) -> str:
    """One value of ``info`` as a person reads it: numbers rounded, mappings as ``key: value, ...``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return " ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in value) or "-"
        return "\n".join(_plain(v) for v in value) or "-"  # a list of problems: one a line
    return str(value)


def info_lines(info: dict) -> list[str]:
    """``info`` as text: one ``name  value`` line per entry, then the splits as a table (images per split, and
    any further count a split records, one column each)."""
    splits = info.get("splits") if isinstance(info.get("splits"), dict) else {}
    rows = [(k.replace("_", " "), _plain(v)) for k, v in info.items() if not (k == "splits" and splits)]
    width = max((len(k) for k, _ in rows), default=0)
    lines = []
    for k, v in rows:
        first, *rest = v.splitlines() or [""]
        lines += [f"{k:<{width}}  {first}"] + [f"{'':<{width}}  {r}" for r in rest]
    if splits:
        cols = ["images"] + sorted({c for v in splits.values() if isinstance(v, dict) for c in v} - {"count"})
        table = [["split", *cols]] + [
            [name, *(_plain(v.get("count" if c == "images" else c)) if isinstance(v, dict)
                     else _plain(v) if c == "images" else "" for c in cols)] for name, v in splits.items()]
        widths = [max(len(r[i]) for r in table) for i in range(len(cols) + 1)]
        lines.append("")
        lines += ["  ".join([r[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(r[1:], widths[1:], strict=True)])
                  for r in table]
    return lines


def shown(value) -> str:
    """A default as a user types it: ``16 32`` for a tuple, ``on``/``off`` for a switch, ``0.0005`` for 5e-4."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(shown(v) for v in value) if value else "none"
    if isinstance(value, float):
        return f"{value:.15g}"
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help says its default once, as typed on the command line: appended as ``(default: X)``
    unless the help already says it (``default:``), left out where there is nothing to show (None, a switch
    that is off unless given). Descriptions and epilogs are filled, except indented lines (examples), kept as
    written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").removesuffix(" (default: %(default)s)")  # Python < 3.11's BooleanOptionalAction
        default = getattr(action, "shown_default", action.default)  # a sweep's flags: the value when not given
        if (not action.option_strings or "default" in text or default is None or default is argparse.SUPPRESS
                or action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)):
            return text  # a positional, said already, nothing to show, or store_true/version/help
        return text + f" (default: {shown(default).replace('%', '%%')})"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        out, para = [], []
        for line in text.splitlines() + [""]:
            if line.strip() and not line[:1].isspace():
                para.append(line.strip())
                continue
            if para:
                out.append(textwrap.fill(" ".join(para), width, initial_indent=indent, subsequent_indent=indent))
                para = []
            if line.strip():
                out.append(indent + line)
            elif out and out[-1]:
                out.append("")
        return "\n".join(out).rstrip("\n")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, with the HelpFormatter; its subcommands' parsers are of this class too (add_subparsers makes
    them of the parent's), so a subcommand added anywhere gets the same help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def examples(*lines: str) -> str:
    """A subcommand's epilog: its example command lines (tests/test_cli.py parses each)."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=(), only_given: bool = False) -> None:
    """One flag per field of the dataclass ``cls`` (--batch-size for batch_size), its type, choices and help
    from the field's declaration (dsimagenet.fields); the help formatter shows its default. ``only_given``:
    flags not on the command line stay out of the namespace (a sweep's base), and the help shows the field's
    default, the value a run takes when nothing else sets it."""
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
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:
            kwargs.update(type=typing.get_args(base)[0], nargs="*")
        else:
            kwargs["type"] = base
            if f.name in choices_:
                kwargs["choices"] = choices_[f.name]
        action = parser.add_argument(flag(f.name), **kwargs)
        if only_given and f.default is not dataclasses.MISSING:
            action.shown_default = f.default


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
        print(f"{args.out}: top-1 error {result['top1_error']}%, top-5 error {result['top5_error']}%, "
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
        grid = merge_grids(grid, parse_grid(" ".join(args.grid)), args.spec)
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


TUNE_OWN = ("out", "data", "epochs", "lr", "width", "weight_decay", "seed", "quiet")


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
    from dsimagenet.runs import plural

    params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in best["params"].items()) \
        if best else ""
    print(f"{args.out}: {plural(s['trials'], 'trial')} ({s['complete']} complete, {s['pruned']} pruned, "
          f"{s['diverged']} diverged); best: "
          + (f"trial {best['number']}, top-1 error {best['top1_error']}%, {params}" if best else "none")
          + f"; storage {s['storage']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from dsimagenet.evaluation import EvalConfig, evaluate_run

    evaluate_run(config_from_args(EvalConfig, args))  # prints its one-line summary unless --quiet
    return 0


def _add_evaluate_command(sub) -> None:
    from dsimagenet.evaluation import EvalConfig

    p = sub.add_parser("evaluate", help="score a trained run on any dataset of its image size",
                       description="Score RUN's last checkpoint (or --checkpoint) on a split of --data: its own "
                                   "val, another method's build,\nImageNetV2 or a class subset at the same "
                                   "resolution. Classes are matched by WNID. Writes\nRUN/eval/<name>/result.json "
                                   "(top-1/top-5 error, loss) and per_class.csv.",
                       epilog="examples:\n  dsimagenet evaluate runs/wrn-28-2 --data out/32_lanczos\n"
                              "  dsimagenet evaluate runs/wrn-28-2 --data v2/32_box --split train")
    p.add_argument("run", metavar="RUN", help="the run directory whose checkpoint is scored")
    add_config_arguments(p, EvalConfig, skip=("run",))
    p.set_defaults(func=_evaluate)


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

    parser = ArgumentParser(
        prog="dsimagenet", description="Downsampled ImageNet: build, load, train, experiment.",
        epilog=examples("dsimagenet demo", "dsimagenet train --data out/32_box --out runs/wrn-28-2 --width 2"))
    parser.add_argument("--version", action="version", version=f"dsimagenet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_data_commands(sub)
    _add_experiment_commands(sub)
    return parser


def _add_data_commands(sub) -> None:
    """classes, convert, info, build."""
    p = sub.add_parser("classes", help="print the 1000 ILSVRC-2012 classes",
                       description="Print the class table: 0-based label, WNID, devkit ID, name.",
                       epilog=examples("dsimagenet classes --order sorted", "dsimagenet classes --csv"))
    p.add_argument("--order", choices=["devkit", "sorted"], default="devkit",
                   help="devkit: the official files' order (kit fox first); sorted: torchvision's (tench first)")
    p.add_argument("--csv", action="store_true", help="comma-separated, with a header")
    p.set_defaults(func=_classes)

    from dsimagenet.dataset import FORMATS
    from dsimagenet.formats.hublabels import LABELS_IN

    labels_in_help = ("the order of the integer labels of Hub parquet/WebDataset shards that do not name their "
                      "classes: devkit (official labels minus one, TFDS) or sorted (sorted WNIDs, torchvision)")
    p = sub.add_parser("convert", help="convert a dataset between official pickle, npz, native, parquet and "
                                       "webdataset formats",
                       description="Stream SRC (a folder of official pickles or npz, their zips, a native "
                                   "dataset, or Hub parquet/WebDataset shards) into OUT, one batch at a time.",
                       epilog=examples("dsimagenet convert Imagenet32_train --out i32-native",
                                       "dsimagenet convert imagenet32-hub --labels-in devkit --out im32 "
                                       "--formats native,parquet"))
    p.add_argument("src", help="dataset folder or official zip")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--formats", default="native",
                   help="the formats to write, comma-separated: native, pickle, npz, parquet, webdataset")
    p.add_argument("--src-format", choices=list(FORMATS),
                   help="which files of SRC to read when it holds several formats")
    p.add_argument("--labels-in", choices=list(LABELS_IN), help=labels_in_help)
    p.add_argument("--quiet", action="store_true", help="no progress, only the summary line and errors")
    p.set_defaults(func=_convert)

    p = sub.add_parser("info", help="describe a dataset: format, size, splits, counts, classes, mean",
                       description="Print what a dataset is; --verify also checks its sha256 checksums "
                                   "(native) or reads every batch file (official).",
                       epilog=examples("dsimagenet info out/32_box", "dsimagenet info Imagenet32_val.zip --json"))
    p.add_argument("path", help="a dataset folder (native, official pickles or npz, Hub parquet or WebDataset "
                                "shards) or an official zip")
    p.add_argument("--verify", action="store_true", help="recompute checksums; exit 1 if any fails")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.add_argument("--labels-in", choices=list(LABELS_IN), help=labels_in_help)
    p.set_defaults(func=_info)

    from dsimagenet.build import BuildConfig

    p = sub.add_parser("build", help="build downsampled datasets from ILSVRC-2012 or a class-folder tree",
                       description="Decode every image once, resize it to every --sizes x --methods exactly as "
                                   "Pillow does, and write OUT/<size>_<method>/ in the official format and/or "
                                   "the native one. Resumable: run the same command again after an interruption.",
                       epilog=examples("dsimagenet build --train ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar "
                                       "--out out --sizes 16 32 64",
                                       "dsimagenet build --folder photos --out out --sizes 32 --methods box nearest"))
    add_config_arguments(p, BuildConfig)
    p.set_defaults(func=_build)


def _add_experiment_commands(sub) -> None:
    """train, sweep, report, tune, demo."""
    from dsimagenet.recipe import TrainConfig

    p = sub.add_parser("train", help="train a Wide ResNet with the paper's recipe",
                       description="Train WRN-N-k on a downsampled ImageNet with the paper's recipe (SGD, momentum "
                                   "0.9, batch 128, lr 0.01 x0.2 after epochs 10/20/30, 40 epochs), or with "
                                   "--recipe nasbench201 NAS-Bench-201's (Nesterov, lr 0.1 cosine over 200 epochs, "
                                   "batch 256, flip + crop 16 with padding 2, its normalisation); flags given beside "
                                   "--recipe override it. Run with torchrun --nproc_per_node=K -m dsimagenet train "
                                   "... for several GPUs.",
                       epilog=examples("dsimagenet train --data out/32_box --out runs/wrn-28-2 --width 2",
                                       "dsimagenet train --data out/16_box --out runs/nb201 --classes 120 "
                                       "--recipe nasbench201"))
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
                                   "the others go on; the exit status is then 1. A train flag not given takes the "
                                   "spec's base value, else the default shown below.",
                       epilog=examples('dsimagenet sweep --grid "lr=0.01,0.05 width=1,2" --data out/16_box '
                                       '--epochs 10 --out sweeps/lr',
                                       "dsimagenet sweep spec.yaml --out sweeps/paper --jobs 2"))
    p.add_argument("spec", nargs="?", help="YAML file: grid: {name: [values]}, base: {train flags}")
    p.add_argument("--grid", action="append",  # given twice, the last once won silently: each adds its names
                   help='the grid, space-separated NAME=VALUE,VALUE,...: e.g. "method=box,nearest '
                        'lr=0.001,0.01 width=1,2 size=16,32 seed=0,1"; given several times, their names together')
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
                                   "correlations, Figs. 1-7 as the runs allow, and a self-contained index.html.",
                       epilog=examples("dsimagenet report sweeps/lr --out report",
                                       "dsimagenet report runs/wrn-28-2 sweeps/paper --out report"))
    p.add_argument("runs", nargs="+", help="run directories or folders holding them")
    p.add_argument("--out", required=True, help="report folder")
    p.set_defaults(func=_report)

    from dsimagenet.tune import TuneConfig

    p = sub.add_parser("tune", help="multi-fidelity hyperparameter search (Optuna, Hyperband over epochs)",
                       description="Search learning rate, width, weight decay and (with --sizes) resolution with "
                                   "Optuna's TPE sampler and Hyperband pruner, epochs as the fidelity. The study "
                                   "lives in --storage (default OUT/study.db): rerun to continue it; point workers "
                                   "on other machines at the same storage to share it.",
                       epilog=examples("dsimagenet tune --data out/16_box --out tune16 --trials 30 --max-epochs 10",
                                       "dsimagenet tune --data 'out/{size}_box' --sizes 16 32 --out tune --workers 2"))
    add_config_arguments(p, TuneConfig, skip=("base",))
    add_config_arguments(p, TrainConfig, skip=TUNE_OWN, only_given=True)
    p.set_defaults(func=_tune)

    p = sub.add_parser("demo", help="run the whole flow offline on a built-in example",
                       description="Write a small synthetic ILSVRC-2012 release in the real layout, build it at "
                                   "16 and 32 px with box and nearest, train WRN-20-1 on it and check that it is "
                                   "far above chance.",
                       epilog=examples("dsimagenet demo", "dsimagenet demo --out /tmp/demo --epochs 3"))
    p.add_argument("--out", default="demo-out", help="output folder")
    p.add_argument("--epochs", type=int, default=6, help="epochs of each training run")
    p.set_defaults(func=_demo)

    _add_evaluate_command(sub)


def main(argv: list[str] | None = None) -> int:
    from dsimagenet.errors import DSImageNetError, describe_os_error
    from dsimagenet.progress import closed_pipes_dropped

    args = build_parser().parse_args(argv)
    try:
        with closed_pipes_dropped():  # `train ... | head -1`: the run goes on, its lines go nowhere
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
