"""Progress of long work: a tqdm bar on a terminal, plain lines in a log, nothing with ``quiet``.

Every command that runs longer than a few seconds (build, train, sweep, tune, demo, convert) reports through
``bar``: ``with bar(total, "sweep", unit="run") as b: ... b.update(1); b.set_postfix_str("3.1k img/s")``.
On a terminal (stderr is a tty) that is tqdm's bar (done of total, rate, ETA). Where stderr is a file or a pipe
(a job log, CI), tqdm's carriage returns would pile into one unreadable line, so it prints one plain line
``desc: done/total unit (pct%), rate, ETA, postfix`` every ``every`` seconds, at each 10% step and at the end.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Lines", "bar"]


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Lines:
    """tqdm's small interface (update, set_postfix_str, set_description, close, a context manager) as plain
    lines on ``file``."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, every: float = 30.0,
                 file=None, disable: bool = False):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every, self.file, self.disable = every, file or sys.stderr, disable
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._initial = initial
        self._step = int(10 * initial / total) if total else -1  # the last tenth printed

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        step = int(10 * self.n / self.total) if self.total else -1
        if now - self._last >= self.every or step > self._step:
            self._step = step
            self._print(now)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{_duration(elapsed)} elapsed")
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _print(self, now: float) -> None:
        self._last = now
        if not self.disable:
            print(self.line(now), file=self.file, flush=True)

    def close(self) -> None:
        if self.disable or self._last is None:
            return
        if self._step < 10 or (self.total and self.n < self.total):  # the end, unless it was just printed
            self._print(time.monotonic())
        self._last = None


def bar(total: int | None, desc: str, unit: str = "it", quiet: bool = False, initial: int = 0,
        every: float = 30.0, file=None):
    """A progress bar over ``total`` units (None: unknown). tqdm on a terminal, ``Lines`` elsewhere; silent
    with ``quiet``."""
    file = file or sys.stderr
    if not quiet and getattr(file, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=file, smoothing=0.05,
                    dynamic_ncols=True)
    return Lines(total, desc, unit, initial, every, file, disable=quiet)
