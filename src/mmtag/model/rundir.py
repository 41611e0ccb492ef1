"""Where `mmtag train` works, and how a finished run takes the place of what was at `--out`.

    RUN/                        a new run trains here: config.yaml, checkpoints/, metrics.csv,
                                train.log (appended to by `--resume`)
    .RUN.partial/               ... or here, when RUN holds a finished run (`--overwrite`)
    .RUN.XXXXXXXX.staging/RUN   the bundle, report.html and metrics.csv, manifest last; then
                                renamed into place (`io.staged_dir`)

    .RUN.lock                   held (an OS lock) by the one process writing RUN: `lock`

A finished run (one with manifest.json) changes only by that last rename, so a training run that
fails or is interrupted leaves it as it was. An interrupted run keeps its config and checkpoints
where `mmtag train --resume RUN` looks for them: `.RUN.partial/` first, then RUN itself.
"""
from __future__ import annotations

import enum
import os
import shlex
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ..errors import MmtagError
from ..io import check_writable_dir, make_dirs, not_a_directory, restore_staged

# Everything mmtag writes into a run directory (dot-files are its temporary files).
RUN_ENTRIES = frozenset({
    "config.yaml", "labels.json", "thresholds.json", "head.safetensors", "encoders", "metrics.json",
    "validation.safetensors", "validation.json", "manifest.json", "report.html", "metrics.csv",
    "checkpoints", "tensorboard", "train.log"})


class State(enum.Enum):
    EMPTY = "empty"  # nothing there, or an empty directory
    FINISHED = "finished"  # a bundle with its manifest
    INTERRUPTED = "interrupted"  # a run that started and never finished


def inspect(run: str | Path) -> State:
    """What `run` holds. A file, or a directory holding anything mmtag does not write there, is
    refused: replacing it would delete what is not mmtag's (with `--overwrite` too)."""
    run = Path(run)
    why = not_a_directory(run)
    if why is not None:
        raise MmtagError(f"{run}: cannot be a run directory: {why}")
    if not run.is_dir():
        return State.EMPTY
    try:
        entries = list(run.iterdir())
    except OSError as exc:
        raise MmtagError(f"{run}: cannot read this directory: {exc.strerror}") from None
    foreign = sorted(e.name for e in entries
                     if e.name not in RUN_ENTRIES and not (e.name.startswith(".") and e.is_file()))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise MmtagError(f"{run}: not an mmtag run directory (it holds {shown}); choose a new or "
                         "empty directory (--overwrite replaces only mmtag runs)")
    names = {e.name for e in entries}
    if "manifest.json" in names:
        return State.FINISHED
    return State.INTERRUPTED if names & RUN_ENTRIES else State.EMPTY


class RunLocked(MmtagError):
    """Another process is writing the run: nothing was touched."""


# Lock files this process holds: path → [fd, depth]. `lock` is re-entrant within a process
# (train holds it while the bundle and the report it writes take it again); OS locks are not.
_held: dict[str, list[int]] = {}
_held_guard = threading.Lock()


def lock_path(run: str | Path) -> Path:
    run = Path(os.path.abspath(run))
    return Path(os.path.realpath(run.parent)) / f".{run.name}.lock"


@contextmanager
def lock(run: str | Path) -> Iterator[None]:
    """Be the only process writing `run` (train, --resume, a bundle save, a report rewrite).

    An OS lock (flock) on `.RUN.lock` beside the run, so the OS releases it when the holder dies
    however it dies: a killed train never blocks the next (its lock file stays behind, unlocked).
    A second writer gets `RunLocked` naming the holder's PID at once, before it has touched
    anything. The holder removes the file while still holding it; a writer that locked a file
    removed under it in the meantime tries again on the new one.
    """
    why = not_a_directory(run)
    if why is not None:
        raise MmtagError(f"{run}: cannot be a run directory: {why}")
    path = lock_path(run)
    key = str(path)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire(path, run), 1]
    try:
        yield
    finally:
        with _held_guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                fd = _held.pop(key)[0]
                with suppress(OSError):
                    os.unlink(path)
                os.close(fd)  # closing the descriptor releases the lock


def _acquire(path: Path, run: str | Path) -> int:
    make_dirs(path.parent)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise MmtagError(f"{path}: cannot create the run's lock file: {exc.strerror}") from None
        try:
            _try_lock(fd)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunLocked(f"{run}: another mmtag process (PID {holder}) is writing this run; "
                            "nothing was changed: wait for it to finish or stop it, or choose "
                            "another --out") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder finished and removed it between our open and our lock
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _holder(fd: int) -> str:
    """The PID the lock's holder wrote (it may not have yet: it writes just after locking)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


if sys.platform == "win32":
    import msvcrt

    def _try_lock(fd: int) -> None:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None
else:
    import fcntl

    def _try_lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def partial_dir(run: str | Path) -> Path:
    """Where a run replacing the finished run at `run` trains until it is complete."""
    run = Path(os.path.abspath(run))
    return run.parent / f".{run.name}.partial"


def resume_command(run: str | Path) -> str:
    return f"mmtag train --resume {shlex.quote(str(run))}"


def resume_dir(run: str | Path) -> Path:
    """The directory holding the interrupted run that `mmtag train --resume RUN` continues."""
    run = Path(run)
    partial = partial_dir(run)
    if (partial / "config.yaml").is_file():
        return partial
    state = inspect(run)
    if state is State.FINISHED:
        raise MmtagError(f"{run}: this run finished already; nothing to resume")
    if not run.exists():
        raise MmtagError(f"{run}: run directory not found")
    if not (run / "config.yaml").is_file():
        raise MmtagError(f"{run}: no config.yaml, so not an mmtag run directory that can be resumed")
    return run


def resumable(run: str | Path) -> bool:
    try:
        resume_dir(run)
    except MmtagError:
        return False
    return True


@dataclass(frozen=True)
class Workspace:
    """Where one `train` writes: `work` while training, `run` once finished."""

    run: Path
    work: Path
    created: bool  # `run` did not exist before this attempt
    resumed: bool

    @property
    def resumable(self) -> bool:
        """Whether `--resume` has something here to continue: a checkpoint (some stage finished
        an epoch), or the earlier attempt this one continued."""
        # imported here: loading a bundle (which reads run directories) never loads training
        from ..training.checkpoint import has_checkpoint

        return self.resumed or has_checkpoint(self.work)

    def abandon(self) -> None:
        """After a failure, remove what this attempt made (config, train.log: the whole
        directory when it made it), unless `resumable`: that stays, for `--resume` once the
        cause is fixed."""
        if self.resumable:
            return
        if self.work != self.run:
            shutil.rmtree(self.work, ignore_errors=True)
            return
        _clear(self.run)
        if self.created:
            with suppress(OSError):
                self.run.rmdir()

    def finish(self) -> None:
        """After the finished run is in place: its training directory, if separate, goes."""
        if self.work != self.run:
            shutil.rmtree(self.work, ignore_errors=True)


def prepare(run: str | Path, *, overwrite: bool = False, resume: bool = False) -> Workspace:
    """Check `--out` before any expensive work, and make the directory to train in.

    Refused, with one line: a file or a path under one, a directory that is not an mmtag run,
    a place where nothing can be written, a finished or interrupted run (unless `overwrite`).
    """
    run = Path(run)
    here = Path.cwd()
    if Path(os.path.abspath(run)) in (here, *here.parents):
        raise MmtagError(f"{run}: the run directory cannot be the current directory or one above it")
    restore_staged(run)
    if resume:
        return Workspace(run, resume_dir(run), created=False, resumed=True)
    state = inspect(run)
    partial = partial_dir(run)
    pending = (partial / "config.yaml").is_file()
    if (state is State.INTERRUPTED or pending) and not overwrite:
        raise MmtagError(f"{run} holds an interrupted run: `{resume_command(run)}` to continue, "
                         "or `--overwrite` to start again")
    if state is State.FINISHED and not overwrite:
        raise MmtagError(f"{run} holds a finished run: give --overwrite to replace it (it stays as "
                         "it is until the new run is complete), or choose another --out")
    check_writable_dir(Path(os.path.abspath(run)).parent)  # the new run is assembled beside RUN
    created = not run.exists()
    shutil.rmtree(partial, ignore_errors=True)  # --overwrite: an interrupted replacement starts again
    if state is State.FINISHED:
        work = partial
    else:
        work = run
        _clear(run)  # empty, or an interrupted run the user chose to start again
    make_dirs(work)
    check_writable_dir(work)
    return Workspace(run, work, created=created, resumed=False)


def _clear(directory: Path) -> None:
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with suppress(OSError):  # cleanup after a failure must not hide that failure
                entry.unlink()
