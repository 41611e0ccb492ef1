"""Progress: tqdm bars in a terminal, plain log lines everywhere else, and a run's train.log.

One policy for every command and for the Python API (`mode`):

- off: `progress=False` (`mmtag -q`), or a torchrun rank other than 0;
- bars: stderr is a terminal: tqdm bars, each labelled with what it does;
- lines: stderr is not a terminal (CI, nohup, `| tee`, a file): no bar, so no '\\r' in the
  output, but plain lines through the logger "mmtag.progress" instead: a long loop's first
  and last line and one every `LINE_INTERVAL` seconds between, and one per training epoch.

Whatever the mode, the same lines go to the train.log of the run being trained (`train_log`,
which `mmtag train` opens in its run directory), with mmtag's warnings: a run keeps its own log
even under `-q`, and in a terminal where the bars leave nothing behind.

"mmtag.progress" has INFO as its own level, so its lines show without `-v`; raise it
(`logging.getLogger("mmtag.progress").setLevel(logging.WARNING)`) to keep them off the console
and in train.log only. When logging is not configured at all, they are written to stderr
directly, as logging's last resort writes warnings.
"""
from __future__ import annotations

import enum
import logging
import math
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.std import tqdm

from . import dist

log = logging.getLogger("mmtag.progress")
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)

# Seconds between two lines of one long loop when stderr is not a terminal: often enough to see
# that a job lives, rarely enough that a log of an hour's run stays readable.
LINE_INTERVAL = 30.0

# A bar as one plain line (tqdm fills the fields): no bar characters, no carriage returns.
PLAIN_FORMAT = ("{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), elapsed {elapsed}, "
                "ETA {remaining}{postfix}")

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Mode(enum.Enum):
    OFF = "off"
    BARS = "bars"
    LINES = "lines"


def mode(show: bool = True) -> Mode:
    """How progress is shown: `show` is the caller's wish (False under `-q`); this process
    decides the rest (only rank 0 speaks; bars only where stderr is a terminal)."""
    if not show or not dist.context().is_main:
        return Mode.OFF
    return Mode.BARS if _isatty(sys.stderr) else Mode.LINES


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


def duration(seconds: float | None) -> str:
    """Elapsed time or an ETA as tqdm writes it (`05:07`, `1:02:03`); `?` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return tqdm.format_interval(max(0.0, seconds))


def eta(elapsed: float, done: int, total: int) -> float | None:
    """Seconds left for `total` steps at the mean pace of the `done` ones that took `elapsed`."""
    return elapsed / done * (total - done) if done > 0 else None


# ------------------------------------------------------------------------------- lines
class TrainLog(logging.FileHandler):
    """The handler writing a run's train.log (see `train_log`)."""


def _run_logs() -> list[TrainLog]:
    return [h for h in logging.getLogger("mmtag").handlers if isinstance(h, TrainLog)]


def _console_configured() -> bool:
    """Whether logging has a handler (other than a train.log) that "mmtag.progress" reaches."""
    logger: logging.Logger | None = log
    while logger is not None:
        if any(not isinstance(h, TrainLog) for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False


def line(message: str, *, show: bool = True, console: bool | None = None) -> None:
    """Report one line of progress. It goes to every open train.log, and to the console when
    `console` says so (by default: when `mode(show)` is lines, i.e. no bar shows this)."""
    if console is None:
        console = mode(show) is Mode.LINES
    if console and log.isEnabledFor(logging.INFO):
        if not _console_configured():
            print(message, file=sys.stderr, flush=True)
        log.info("%s", message)  # the console's handlers and, through "mmtag", each train.log
        return
    runs = _run_logs()
    if runs:
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, "%s", (message,), None)
        for handler in runs:
            handler.handle(record)


@contextmanager
def train_log(path: str | Path) -> Iterator[Path]:
    """While open, `path` receives (appended: a resumed run continues its log) every progress
    line and whatever the "mmtag" logger lets through (its warnings; with `-v` its info too),
    one timestamped line each."""
    path = Path(path)
    handler = TrainLog(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("mmtag")
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()


# -------------------------------------------------------------------------------- bars
class _LineStream:
    """Where a `Bar` writes when no terminal shows it: each of tqdm's status updates ('\\r' and
    the status) becomes one `line`, repeats dropped."""

    def __init__(self, console: bool) -> None:
        self.console = console
        self.last = ""

    def write(self, text: str) -> int:
        for part in re.split(r"[\r\n]", _ANSI.sub("", text)):
            part = part.strip()
            if part and part != self.last:
                self.last = part
                line(part, console=self.console)
        return len(text)

    def flush(self) -> None:
        pass


class Bar(tqdm):  # type: ignore[misc]
    """A tqdm bar labelled with what it does (`label`), following `mode(show)`.

    In a terminal it is a bar on stderr, and its last state is also written to train.log. Where
    no terminal shows it, its progress comes as plain lines instead (console and train.log, or
    under `show=False` train.log only), at most every `LINE_INTERVAL` seconds; with
    `lines=False` there are none (the caller writes lines of its own, e.g. one per epoch).

    `finish()` closes it as complete at the count it reached: a loop stopped early on purpose
    (early stopping) ends at 100%, not frozen part-way.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, label: str,
                 total: float | None = None, unit: str = "it", show: bool = True,
                 lines: bool = True, **kwargs: Any) -> None:
        self.mode = mode(show)
        if self.mode is Mode.BARS:
            super().__init__(iterable, desc=label, total=total, unit=unit, file=sys.stderr,
                             dynamic_ncols=True, **kwargs)
        else:
            super().__init__(iterable, desc=label, total=total, unit=unit,
                             file=_LineStream(console=self.mode is Mode.LINES),
                             mininterval=LINE_INTERVAL, maxinterval=LINE_INTERVAL,
                             bar_format=PLAIN_FORMAT, disable=not lines, **kwargs)

    def plain(self) -> str:
        """The bar's state as one plain line."""
        return self.format_meter(**{**self.format_dict, "bar_format": PLAIN_FORMAT})

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        # Off a terminal a refresh is a line: the postfix waits for the next timed one.
        super().set_postfix(ordered_dict, refresh=refresh and self.mode is Mode.BARS, **kwargs)

    def finish(self) -> None:
        if self.total is not None and self.n < self.total:
            self.total = self.n
        self.close()

    def close(self) -> None:
        if self.mode is Mode.BARS and not self.disable and _run_logs():
            line(self.plain(), console=False)
        super().close()
