"""Run model-written programs (HumanEval) so that they cannot hang the run or touch the user's files.

Each program runs in its own fresh Python process, in a temporary directory removed afterwards, in
its own process group (killed as a whole at the timeout), with limits on memory, CPU time, processes
and file size that the program cannot raise. As root (CI), it runs as the unprivileged user `nobody`:
root ignores process limits and file permissions. Inside, an audit hook refuses writes, deletes and
renames outside the directory, starting programs, and network connections; it is a second line, not
a boundary (a program could still escape through ctypes), so `nobody` and the limits do the real work.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from prolora_cli.errors import UserError

SANDBOX_USER = "nobody"
MEMORY = 1 << 30        # address space per program
PROCESSES = 8           # for the sandbox user as a whole (a fork loop stops there)
FILE_SIZE = 16 << 20    # largest file a program may write, its output included

# Runs before the program, in its process: limits that cannot be raised again, then the audit hook.
GUARD = '''\
import os as _os, resource as _r, sys as _sys
for _limit, _value in ((_r.RLIMIT_AS, {memory}), (_r.RLIMIT_CPU, {cpu}), (_r.RLIMIT_NPROC, {processes}),
                       (_r.RLIMIT_FSIZE, {file_size}), (_r.RLIMIT_CORE, 0)):
    _r.setrlimit(_limit, (_value, _value))
def _guard(root=_os.getcwd() + _os.sep, realpath=_os.path.realpath, fspath=_os.fspath):
    paths = {{"open", "os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown",
             "os.truncate", "os.symlink", "os.link", "os.utime", "shutil.rmtree", "os.chdir"}}
    refused = {{"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
               "socket.connect", "socket.bind", "os.kill", "os.killpg", "ctypes.dlopen"}}
    def hook(event, args):
        if event in refused:
            raise PermissionError(f"sandbox: {{event}} is not allowed")
        if event not in paths or isinstance(args[0], int):
            return
        if event == "open":
            mode, flags = args[1] or "", args[2] or 0
            if not (set(mode) & set("wax+") or flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC)):
                return
        for path in args[:2] if event in ("os.rename", "os.symlink", "os.link") else args[:1]:
            if isinstance(path, (str, bytes, _os.PathLike)) and not realpath(_os.fsdecode(fspath(path))).startswith(root):
                raise PermissionError(f"sandbox: {{event}} outside the sandbox directory")
    _sys.addaudithook(hook)
_guard()
del _guard, _limit, _value
'''


def sandbox_ids() -> tuple[int, int] | None:
    """(uid, gid) to run as: `nobody` when we are root, else None (stay as the current user)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SANDBOX_USER)
    except KeyError:
        raise UserError(f"running as root, and there is no user {SANDBOX_USER!r} to run programs as") from None
    return entry.pw_uid, entry.pw_gid


@functools.lru_cache(maxsize=None)
def interpreter() -> str:
    """A Python the sandbox user can run: ours, or the system's when ours lives in root's home."""
    candidates = [os.path.realpath(sys.executable), shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")]
    for python in filter(None, dict.fromkeys(candidates)):
        try:
            if run_program("pass", 10, python) == "passed":
                return python
        except PermissionError:
            continue
    raise UserError(f"no Python interpreter that user {SANDBOX_USER!r} may run (ours is {candidates[0]}); "
                    "install python3 system-wide")


def run_program(code: str, timeout: float, python: str | None = None) -> str:
    """'passed', 'timed out', or 'failed: <the last line of its output>'."""
    ids = sandbox_ids()
    folder = Path(tempfile.mkdtemp(prefix="prolora-sandbox-"))
    try:
        guard = GUARD.format(memory=MEMORY, cpu=int(timeout) + 1, processes=PROCESSES, file_size=FILE_SIZE)
        (folder / "program.py").write_text(guard + code, encoding="utf-8")
        if ids:
            for path in (folder, folder / "program.py"):
                os.chown(path, *ids)
        with open(folder / "output", "w+b") as output:  # the program writes through the inherited fd
            process = subprocess.Popen(
                [python or interpreter(), "-I", "-B", "program.py"], cwd=folder, stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT,
                env={"PATH": "/usr/bin:/bin", "HOME": str(folder), "TMPDIR": str(folder)},
                start_new_session=True, **({"user": ids[0], "group": ids[1], "extra_groups": []} if ids else {}))
            try:
                if process.wait(timeout=timeout) == 0:
                    return "passed"
            except subprocess.TimeoutExpired:
                return "timed out"
            finally:
                try:
                    os.killpg(process.pid, 9)  # the program and anything it started
                except (ProcessLookupError, PermissionError):
                    pass
                process.wait()
            output.seek(max(0, output.seek(0, os.SEEK_END) - 4096))
            lines = [line for line in output.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return "failed: " + (lines[-1][:200] if lines else f"exit status {process.returncode}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
