"""Writes that never leave a half-written file or folder behind (write beside, then rename), a lock per
output so that two commands never write one, and OS errors turned into one line.

An OS error while a file or folder is being written (no space left, a file size limit, a read-only
disk) becomes a MachineFault naming what was being written; the temporary is removed, so the user's
earlier file is untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

from prolora_cli.errors import MachineFault, UserError, os_error_in, os_fault


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, folder: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; what lands for the user gets the mode
    any other file of theirs would (0644/0755 under the usual umask)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success rename it over `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        _usual_mode(Path(tmp), folder=False)
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - only OS errors are translated; the rest go on as they were
        if (os_error := os_error_in(e)) is None:
            raise
        raise write_fault(os_error, path, tmp) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_output_free(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before any work is done, to replace an existing --output without --overwrite."""
    if Path(path).exists() and not overwrite:
        raise UserError(f"--output {path} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces `path` (only if overwrite is set)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        yield tmp
        _usual_mode(tmp, folder=True)
        if path.exists():
            if not overwrite:
                raise FileExistsError(path)
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - only OS errors are translated; the rest go on as they were
        if (os_error := os_error_in(e)) is None:
            raise
        raise write_fault(os_error, path, tmp) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def write_fault(e: OSError, path: Path, tmp) -> MachineFault:
    """The one line for an OS error met while writing `path` (through its temporary `tmp`): a failed write
    names `path`, not the temporary; a failed read of another file (an input) names that file."""
    ours = e.filename is None or Path(e.filename) == path or (tmp is not None and str(e.filename).startswith(str(tmp)))
    return os_fault(e, "cannot write", path) if ours else os_fault(e, "cannot read")


def write_failure_reason(folder: Path) -> str | None:
    """A likely reason for a write that failed without saying why (torch's writer reports only "file
    write failed"): a file size limit on this process, or a full disk."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return f"File too large (EFBIG): this process may not write files past {soft:,} bytes"
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < 1 << 20:
            return "No space left on device (ENOSPC)"
    return None


def check_free_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse before starting when the disk that will hold `path` has less than `needed` bytes free."""
    folder = Path(path).parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise MachineFault(f"not enough space for {what} {path}: it needs {needed / 2**20:,.1f} MiB, "
                           f"{folder} has {free / 2**20:,.1f} MiB free")


def clean_up_after(target: Path, say: Callable[[str], None]) -> None:
    """What a writer of `target` killed mid-write (SIGKILL, a power cut) left beside it: its temporaries
    are removed, and an earlier output it had moved aside to replace is put back if the new one never
    landed. Runs under the lock, so no writer is using them."""
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        os.replace(old, target)
        say(f"put {target} back: a replace of it was interrupted")
    for stale in [old, *target.parent.glob(f".{glob.escape(target.name)}.*.tmp")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        elif stale.exists():
            stale.unlink()


@contextlib.contextmanager
def exclusive(target: str | os.PathLike, say: Callable[[str], None] = lambda _m: None):
    """Hold `target`'s lock while writing it: an OS advisory lock (flock) on `TARGET.lock` beside it, which
    the kernel releases when the holder exits or dies. A second writer gets one line naming the holder;
    a lock left by a holder that died is taken over with a note. The lock file may stay behind, empty."""
    target = Path(target)
    lock = target.with_name(target.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise os_fault(e, "cannot create the lock") from None
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{target} is being written by {holder}; wait for it to finish, or stop it") from None
        held = True
        left = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if left:
            say(f"taking over {lock}: its holder ({left}) is no longer running")
            clean_up_after(target, say)
        note = f"prolora pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        with contextlib.suppress(OSError):  # a full disk must not stop the lock itself
            os.ftruncate(fd, 0)
            os.pwrite(fd, note.encode(), 0)
        yield
    finally:
        if held:  # released by this process, whatever ended the command: nothing to take over
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        os.close(fd)
