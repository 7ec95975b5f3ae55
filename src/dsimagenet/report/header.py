"""What produced a report, said at its top: the data (name, size, method, classes, images), the training (models,
epochs, learning rates, seeds), the devices, the dates and the versions. Everything is read from the runs (their
config.json, result.json, per_class.csv and file times) and, where it is still there, the data's meta.json.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections import defaultdict
from pathlib import Path

from dsimagenet.errors import DSImageNetError
from dsimagenet.runs import CONFIG, PER_CLASS, RESULT

MAX_NAMED_CLASSES = 10  # more class names than this would be a paragraph, not a header line


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _listing(values, fmt=str) -> str:
    vs = sorted(set(values))
    return ", ".join(fmt(v) for v in vs)


def class_names(run) -> list[str]:
    """The class names in label order, from the run's per_class.csv (what the run itself was trained on)."""
    path = Path(run.path) / PER_CLASS
    try:
        with open(path, newline="") as f:
            return [row["name"] for row in csv.DictReader(f)]
    except (OSError, KeyError, csv.Error):
        return []


def _data_line(data: str, runs: list, named: bool) -> str:
    """``data``: path, then size, method, classes (``named``: with their names, when few) and the split counts
    where meta.json says."""
    from dsimagenet.formats import native

    r = runs[0]
    parts = [f"{_listing((x.image_size for x in runs), lambda s: f'{s} px')}",
             _listing(x.method or "method unknown" for x in runs)]
    n = _listing(x.num_classes for x in runs)
    names = class_names(r)
    parts.append(f"{n} classes" + (f" ({', '.join(names)})" if named and 0 < len(names) <= MAX_NAMED_CLASSES else ""))
    try:
        meta = native.read_meta(data)
        counts = {k: v["count"] for k, v in meta["splits"].items()}
        parts.append(" / ".join(f"{v:,} {k}" for k, v in counts.items()) + " images")
    except (OSError, ValueError, DSImageNetError):  # official files, or data moved since
        parts.append("image counts unknown (not native data, or no longer at this path)")
    return f"{data}: " + "; ".join(parts)


def facts(runs, excluded=()) -> list[tuple[str, str]]:
    """(label, text) lines that say what produced the report."""
    from dsimagenet import __version__

    by_data = defaultdict(list)
    for r in runs:
        by_data[r.train_config.data].append(r)
    configs = [r.train_config for r in runs]
    models = _listing(f"WRN-{r.depth}-{r.train_config.width:g}" for r in runs)
    runs_line = f"{len(runs)} finished" + (f", {len(excluded)} left out (listed below Table 1)" if excluded else "")
    seeds = len({c.seed for c in configs})
    devices = _listing(f"{r.config.get('device', '?')}" + (f" x {r.config['world_size']}"
                                                            if r.config.get("world_size", 1) != 1 else "")
                       for r in runs)
    total = sum(r.result["train_seconds"] for r in runs)
    starts = [(Path(r.path) / CONFIG).stat().st_mtime for r in runs]
    ends = [(Path(r.path) / RESULT).stat().st_mtime for r in runs]
    made_by = {(r.config.get("versions") or {}).get("dsimagenet", "?") for r in runs}
    torch = {(r.config.get("versions") or {}).get("torch") for r in runs} - {None}
    names = {tuple(class_names(rs[0])) for rs in by_data.values()}
    shared = len(names) == 1 and 0 < len(next(iter(names))) <= MAX_NAMED_CLASSES  # said once, not per dataset
    return [
        *(("data", _data_line(d, rs, not shared)) for d, rs in sorted(by_data.items())),
        *((("classes", ", ".join(next(iter(names)))),) if shared else ()),
        ("runs", f"{runs_line}: {models}; epochs {_listing(c.epochs for c in configs)}; learning rates "
                 f"{_listing((c.lr for c in configs), lambda x: f'{x:g}')}; {seeds} seed{'s' * (seeds > 1)}"),
        ("devices", f"{devices}; {total / 60:.1f} min of training in all"),
        ("dates", f"runs from {_utc(min(starts))} to {_utc(max(ends))}; report written "
                  f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}"),
        ("versions", f"runs made by dsimagenet {', '.join(sorted(made_by))}"
                     + (f" with torch {', '.join(sorted(torch))}" if torch else "")
                     + f"; report by dsimagenet {__version__}"),
    ]
