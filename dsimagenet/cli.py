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


def build_parser() -> argparse.ArgumentParser:
    from dsimagenet import __version__

    parser = argparse.ArgumentParser(
        prog="dsimagenet", description="Downsampled ImageNet: build, load, train, experiment.")
    parser.add_argument("--version", action="version", version=f"dsimagenet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `dsimagenet classes | head` closes the pipe early; that is not an error
        sys.stderr.close()
        return 0
    except (OSError, ValueError, KeyError) as e:  # bad input: one clear line naming the file, exit 1
        print(f"dsimagenet {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
