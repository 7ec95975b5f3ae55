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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `dsimagenet classes | head` closes the pipe early; that is not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
