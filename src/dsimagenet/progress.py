"""Progress of long work: a tqdm bar on a terminal, plain lines in a log, nothing with ``quiet``.

Every command that runs longer than a few seconds (build, train, sweep, tune, demo, convert) reports through
``bar``: ``with bar(total, "sweep", unit="run") as b: ... b.update(1); b.set_postfix_str("3.1k img/s")``.
On a terminal (stderr is a tty) that is tqdm's bar (done of total, rate, ETA). Where stderr is a file or a pipe
(a job log, CI), tqdm's carriage returns would pile into one unreadable line, so it prints one plain line
``desc: done/total unit (pct%), rate, ETA, postfix`` every ``every`` seconds, at each 10% step and at the end.

A reader that leaves (``dsimagenet train ... | head -1``) does not stop the work: ``closed_pipes_dropped``
(the command line's, and each worker process's) sends what is written after it left to /dev/null.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

__all__ = ["Lines", "bar", "closed_pipes_dropped", "drop_closed_pipes"]


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _rate(rate: float) -> str:
    """Three significant digits, never in e-notation: 2,140 img/s, not ``2.14e+03``."""
    return f"{float(f'{rate:.3g}'):,.0f}" if rate >= 100 else f"{rate:.3g}"


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
            parts.append(f"{_rate(rate)} {self.unit}/s")
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


class _Dropping:
    """A text stream whose reader may leave: at the first BrokenPipeError its file descriptor is pointed at
    /dev/null (so that child processes started later, and Python's own flush at exit, write there too) and the
    write is done again there. Everything else is the stream's own."""

    def __init__(self, stream):
        self._stream = stream

    def _dropped(self, again, *args):
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):  # a stream of no file (a test's capture): nothing to point
            return None
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
        return again(*args)

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            return self._dropped(self._stream.write, text)

    def flush(self):
        try:
            return self._stream.flush()
        except BrokenPipeError:
            return self._dropped(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def drop_closed_pipes() -> None:
    """From now on, stdout and stderr of this process drop what is written after their reader left, instead of
    raising BrokenPipeError out of whatever printed: a training run, a sweep or a build stopped by ``| head``
    would otherwise end half done (the command line once exited 0 then, saying nothing). A worker process's
    initializer calls it; the command line uses ``closed_pipes_dropped``."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Dropping):
            setattr(sys, name, _Dropping(stream))


@contextlib.contextmanager
def closed_pipes_dropped():
    """``drop_closed_pipes`` for the duration of a command; stdout and stderr are given back after it."""
    before = sys.stdout, sys.stderr
    drop_closed_pipes()
    try:
        yield
    finally:
        sys.stdout, sys.stderr = before
