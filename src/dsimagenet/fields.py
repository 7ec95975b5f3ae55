"""Configuration fields that say, each in one place, what they are: the one source of flags, help and checks.

Every field of a config dataclass (``TrainConfig``, ``BuildConfig``, ``TuneConfig``) is declared with
``recipe(...)`` or ``option(...)``:

    schedule: Literal["step", "cosine", "sgdr"] = recipe("step", help="step (the paper), cosine, or sgdr")
    log_every: int = option(100, check=integer(1), help="print every N steps")

- its type is the annotation (``Literal[...]`` for a choice: the CLI's ``choices`` and the check come from it);
- its help text is the flag's ``--help``;
- its allowed values are ``check``: (accepts the value, the allowed values in words); a ``Literal`` or ``bool``
  field needs none, its annotation says it;
- ``recipe`` or ``option`` says whether it is part of what is computed (a resumed run or build must match it) or
  how the work is operated (where, how loudly, how often it checkpoints: free to change on resume).

A field declared without them has no role, so ``roles`` (and with it ``operational``) refuses the whole class:
forgetting cannot silently change what a resume compares. Kept free of torch and numpy: the CLI reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable

from dsimagenet.errors import ConfigError

RECIPE = "recipe"  # what is computed: compared when a run (or a build) is resumed
OPTION = "option"  # how it is operated: may change when it is resumed
Rule = tuple[Callable[[object], bool], str]  # (accepts the value, the allowed values in words)

# counts (epochs, batches, steps, pixels) go through numpy's and torch's int64 arithmetic (step * batch_size):
# 2**31 - 1 keeps every product of two of them in range, and is beyond any real run
MAX_COUNT = 2**31 - 1


def _field(role: str, default, check: Rule | None, help: str, default_factory) -> dataclasses.Field:
    kw = {"default": default} if default_factory is dataclasses.MISSING else {"default_factory": default_factory}
    return dataclasses.field(**kw, metadata={"role": role, "check": check, "help": help})


def recipe(default=dataclasses.MISSING, *, help: str, check: Rule | None = None,
           default_factory=dataclasses.MISSING):
    """A field that is part of what is computed (a resume with another value is refused)."""
    return _field(RECIPE, default, check, help, default_factory)


def option(default=dataclasses.MISSING, *, help: str, check: Rule | None = None,
           default_factory=dataclasses.MISSING):
    """A field that says how the work is operated (it may change on resume)."""
    return _field(OPTION, default, check, help, default_factory)


# --- the allowed values, in words ---------------------------------------------------------------------------

def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(lo: int, hi: int | None = None, optional: bool = False) -> Rule:
    """Without ``hi``, a count: at most MAX_COUNT, which ``check`` says only to a value above it."""
    text = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
    return (lambda v: (optional and v is None) or (is_int(v) and lo <= v <= (MAX_COUNT if hi is None else hi)),
            text + (" (or left out)" if optional else ""))


def whole(lo: int, hi: int | None = None, optional: bool = False) -> Rule:
    """An integer with a bound of its own (no MAX_COUNT), in a build's words: ``1..1,024`` or ``a whole number >=
    1``."""
    words = (f"{lo}..{hi:,}" if hi is not None else f"a whole number >= {lo}") + (" (or left out)" if optional else "")
    return (lambda v: (optional and v is None) or (is_int(v) and lo <= v and (hi is None or v <= hi))), words


def number(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def ok(v) -> bool:
        return (is_number(v) and (v > lo if lo_open else v >= lo)
                and (hi is None or (v < hi if hi_open else v <= hi)))

    low = f"> {lo:.9g}" if lo_open else f">= {lo:.9g}"
    if hi is None:
        return ok, f"a finite number {low}"
    return ok, f"a number in {'(' if lo_open else '['}{lo:.9g}, {hi:.9g}{')' if hi_open else ']'}"


def one_of(choices: tuple) -> Rule:
    return (lambda v: isinstance(v, str) and v in choices), "one of " + ", ".join(choices)


def text(optional: bool = False) -> Rule:
    return ((lambda v: (optional and v is None) or (isinstance(v, str) and v != "")),
            "a path" + (" (or left out)" if optional else ""))


def flag_value() -> Rule:
    return (lambda v: isinstance(v, bool)), "true or false"


# --- what the declarations say, read back --------------------------------------------------------------------

def flag(name: str) -> str:
    """The command-line flag of a field: ``sgdr_t0`` -> ``--sgdr-t0``."""
    return "--" + name.replace("_", "-")


def _hints(cls) -> dict:
    """Each field's annotation, ``X | None`` unwrapped to ``X``."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        out[name] = hint
    return {f.name: out[f.name] for f in dataclasses.fields(cls)}


def choices(cls) -> dict[str, tuple]:
    """The allowed values of every ``Literal`` field."""
    return {name: typing.get_args(h) for name, h in _hints(cls).items() if typing.get_origin(h) is typing.Literal}


def field_types(cls) -> dict[str, type]:
    """The type of each field of a config dataclass, ``X | None`` unwrapped to ``X`` (``tuple[int, ...]`` kept), a
    ``Literal`` as the type of its values: what a command-line flag or a sweep value is parsed as."""
    return {name: type(typing.get_args(h)[0]) if typing.get_origin(h) is typing.Literal else h
            for name, h in _hints(cls).items()}


@functools.cache
def roles(cls) -> dict[str, str]:
    """Each field's role (RECIPE or OPTION); TypeError, naming them, if any field was declared without one (or
    without its help): a bug of the declaration, found on import or by the first test that makes one."""
    bad = [f.name for f in dataclasses.fields(cls)
           if f.metadata.get("role") not in (RECIPE, OPTION) or not f.metadata.get("help")]
    if bad:
        raise TypeError(f"{cls.__name__}: declare {', '.join(bad)} with dsimagenet.fields.recipe(...) or "
                        "option(...), with its help")
    return {f.name: f.metadata["role"] for f in dataclasses.fields(cls)}


def operational(cls) -> frozenset[str]:
    """The fields that may change on resume."""
    return frozenset(name for name, role in roles(cls).items() if role == OPTION)


def help_text(cls) -> dict[str, str]:
    roles(cls)
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


@functools.cache
def rules(cls) -> dict[str, Rule]:
    """Each field's rule: its ``check``, or what its ``Literal`` / ``bool`` annotation allows."""
    roles(cls)
    kinds, options, out = field_types(cls), choices(cls), {}
    for f in dataclasses.fields(cls):
        rule = f.metadata["check"]
        if rule is None and f.name in options:
            rule = one_of(options[f.name])
        elif rule is None and kinds[f.name] is bool:
            rule = flag_value()
        if rule is None:
            raise TypeError(f"{cls.__name__}.{f.name}: give its check (the values it allows)")
        out[f.name] = rule
    return out


def check(c) -> None:
    """Raise ConfigError, naming the flag and the allowed values, for the first field of ``c`` out of range."""
    for name, (ok, allowed) in rules(type(c)).items():
        value = getattr(c, name)
        if not ok(value):
            if is_int(value) and value > MAX_COUNT and allowed.startswith("an integer >="):
                allowed = allowed.replace(" (or left out)", "") + f" and at most {MAX_COUNT}"
            raise ConfigError(f"{flag(name)} must be {allowed}, not {value!r}")
