"""A sweep's grid: every combination of the values given, from ``--grid`` text or a YAML spec, each value typed
and checked like the TrainConfig field it sets, and the runs it makes (name, TrainConfig).

    >>> grid = parse_grid("method=box,nearest lr=0.001,0.01 size=16,32")
    >>> grid, base = check(grid, {"data": "out/{size}_{method}", "epochs": 40})
    >>> [name for name, config in expand(grid, base, "sweeps/lr")][:1]
    ['method=box_lr=0.001_size=16']

``method`` and ``size`` choose the data: ``data`` may hold ``{size}`` and ``{method}``; without them it is taken
as a ``dsimagenet build`` output folder and ``{data}/{size}_{method}`` is used.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import typing
from collections import Counter
from pathlib import Path

from dsimagenet.errors import ConfigError
from dsimagenet.recipe import TrainConfig, field_types

DATA_KEYS = ("method", "size")


def check(grid: dict, base: dict) -> tuple[dict[str, list], dict]:
    """The grid and base values typed like the TrainConfig fields they set (text is parsed: YAML reads ``1e-3``
    as text), each checked by TrainConfig's own rules: ConfigError naming the grid key and what is allowed."""
    if not isinstance(grid, dict) or not isinstance(base, dict):
        raise ConfigError("the sweep's grid and base must be mappings of name to value(s)")
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(DATA_KEYS)
    unknown = sorted(set(map(str, grid)) - known) + sorted(set(map(str, base)) - known)
    if unknown:
        raise ConfigError(f"unknown sweep parameters {unknown}: use TrainConfig fields (the train command's "
                          "flags, with _ for -), method or size")
    if "out" in grid or "out" in base:
        raise ConfigError("'out' is chosen by the sweep (one directory per run under --out)")
    both = sorted(set(grid) & set(base))
    if both:
        raise ConfigError(f"{', '.join(both)}: given both in the grid and as a fixed value (a flag or the spec's "
                          "base): give each once")
    base = {k: typed(k, v, "base") for k, v in base.items()}
    _probe(base, "base")
    return {name: _typed_values(name, values, base) for name, values in grid.items()}, base


def _typed_values(name: str, values, base: dict) -> list:
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"grid: {name} has no values (give one or more: {name}=a,b)")
    out = [typed(name, v, "grid") for v in values]
    seen = set()
    for v in out:
        if v in seen:  # 1 == 1.0: the same run
            raise ConfigError(f"grid: {name}={v} is given twice (two runs would share one directory)")
        seen.add(v)
        if name != "method":
            _probe({**base, name: v}, f"grid: {name}={v}")
    return out


def _probe(fields: dict, where: str) -> None:
    """TrainConfig's own check of these values (the other fields at their defaults)."""
    fields = {k: v for k, v in fields.items() if k != "method"}
    try:
        TrainConfig(**{"data": "data", "out": "out", **fields})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _optional(name: str) -> bool:
    hint = typing.get_type_hints(TrainConfig)[name]
    return type(None) in typing.get_args(hint)


def convert(name: str, value: str, where: str = "--grid"):
    """A value from text, typed like the TrainConfig field it sets."""
    if name == "method":
        return value
    base = field_types(TrainConfig).get(name, str)
    what = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(base, "epochs as 10/20/30")
    if value.lower() == "none":
        if not _optional(name):
            raise ConfigError(f"{where}: {name}={value}: {name} cannot be none (expected {what})")
        return None
    try:
        if base is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if typing.get_origin(base) is tuple:
            return tuple(int(x) for x in value.split("/"))  # milestones=10/20/30
        out = base(value)
    except ValueError:
        raise ConfigError(f"{where}: {name}={value}: expected {what}") from None
    if isinstance(out, float) and not math.isfinite(out):
        raise ConfigError(f"{where}: {name}={value}: expected a finite number")
    return out


def typed(name: str, value, where: str):
    """A grid or base value as the field takes it: text parsed; a list for a tuple field made a tuple; an integer
    for a number field kept (TrainConfig accepts both). Range checks are TrainConfig's."""
    if name == "method":
        if not isinstance(value, str) or not value or "/" in value:
            raise ConfigError(f"{where}: method={value!r}: expected a resize method name such as box or nearest")
        return value
    kind = field_types(TrainConfig)[name]
    if isinstance(value, str) and kind is not str:
        return convert(name, value, where)
    if isinstance(value, list):
        return tuple(value)
    if typing.get_origin(kind) is tuple and isinstance(value, int) and not isinstance(value, bool):
        return (value,)  # milestones: 10 in a YAML base
    return value


def parse_grid(text: str) -> dict[str, list]:
    """``"lr=0.001,0.01 width=1,2"`` -> ``{"lr": [0.001, 0.01], "width": [1.0, 2.0]}``; a name given twice is an
    error (the last would win silently)."""
    grid = {}
    for part in text.split():
        name, sep, values = part.partition("=")
        if not sep or not name or not values:
            raise ConfigError(f"--grid: {part!r} is not name=value1,value2,...")
        if name in grid:
            raise ConfigError(f"--grid: {name} is given twice; give all its values once: {name}=a,b,c")
        items = values.split(",")
        if any(v == "" for v in items):
            raise ConfigError(f"--grid: {part!r} has an empty value")
        grid[name] = [convert(name, v) for v in items]
    return grid


def merge_grids(spec: dict, flags: dict, spec_path: str) -> dict:
    """The spec file's grid and --grid's, refusing a name in both (neither may silently win)."""
    both = sorted(set(spec) & set(flags))
    if both:
        raise ConfigError(f"{', '.join(both)}: in the grid of {spec_path} and in --grid: give each once")
    return {**spec, **flags}


def _yaml_loader():
    """A safe YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the constructor below says so
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first on line {first})", key_node.start_mark)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def load_spec(path: str | Path) -> tuple[dict, dict]:
    """(grid, base) from a YAML file: ``grid: {lr: [0.001, 0.01], ...}`` and ``base: {data: ..., epochs: 40}``.
    A file that is not such YAML is a ConfigError naming the file, the line and what is wrong."""
    import yaml

    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    try:
        spec = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = ": ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{path}: {where}{what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    spec = {} if spec is None else spec
    shape = "a mapping with 'grid' (name: [values]) and optionally 'base' (name: value)"
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected {shape}, not {type(spec).__name__}")
    other = sorted(map(str, set(spec) - {"grid", "base"}))
    if other:
        raise ConfigError(f"{path}: unknown top-level keys {other}: expected {shape}")
    grid, base = spec.get("grid") or {}, spec.get("base") or {}
    if not isinstance(grid, dict) or not isinstance(base, dict):
        raise ConfigError(f"{path}: 'grid' and 'base' must be mappings (name: values, name: value)")
    for name, values in grid.items():
        if values is None or values == []:
            raise ConfigError(f"{path}: grid: {name} has no values")
    return {str(k): v if isinstance(v, list) else [v] for k, v in grid.items()}, {str(k): v for k, v in base.items()}


def run_name(values: dict) -> str:
    def text(v) -> str:
        return "-".join(map(str, v)) if isinstance(v, tuple) else str(v).replace("/", "-")  # never a subfolder

    return "_".join(f"{k}={text(v)}" for k, v in values.items()) or "run"


def expand(grid: dict[str, list], base: dict, out: str) -> list[tuple[str, TrainConfig]]:
    """Every run of the (checked) grid, in a fixed order: (name, config), each config's ``out`` a folder of
    ``out`` named by the values that vary."""
    names = list(grid)
    runs = []
    for combo in itertools.product(*(grid[n] for n in names)):
        values = dict(zip(names, combo, strict=True))
        fields = {**{k: v for k, v in base.items() if k != "method"},
                  **{k: v for k, v in values.items() if k not in DATA_KEYS}}
        data = str(fields.get("data", ""))
        if not data:
            raise ConfigError("no data: give --data (it may contain {size} and {method})")
        size = values.get("size", base.get("size"))
        method = values.get("method", base.get("method", "box"))
        if any(k in values for k in DATA_KEYS) and "{" not in data:
            data = os.path.join(data, "{size}_{method}")
        if "{size}" in data and size is None:
            raise ConfigError(f"--data {data} needs a size: put size in the grid or give --size")
        try:
            fields["data"] = data.format(size=size, method=method)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"--data {data}: only {{size}} and {{method}} may be filled in ({e!r})") from None
        if "size" in values:
            fields["size"] = values["size"]
        name = run_name(values)
        try:
            config = TrainConfig(**fields, out=str(Path(out) / name))
        except ConfigError as e:
            raise ConfigError(f"sweep run {name}: {e}") from None
        runs.append((name, config))
    twice = [n for n, k in Counter(n for n, _ in runs).items() if k > 1]
    if twice:
        raise ConfigError(f"grid values that differ only in spelling give runs of one name: {twice}")
    return runs
