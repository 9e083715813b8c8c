"""The exceptions the CLI turns into one line on stderr, and their exit codes (docs/reliability.md):
UserError 2 (bad input), MachineFault 1 (the machine failed: a full disk, a file that cannot be written),
VerificationFailed 1 (a written model does not reproduce base + adapter)."""

from __future__ import annotations

import errno
import os
import re

OS_ERROR = re.compile(r"\(os error (\d+)\)")


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed record, an impossible setting."""


class MachineFault(Exception):
    """The machine failed the command (no space left, a read-only disk, a file size limit); the user's
    earlier files are intact and no partial file is left."""


class VerificationFailed(Exception):
    """A written model does not reproduce base + adapter within the tolerance; nothing was written."""


def os_error_in(e: BaseException) -> OSError | None:
    """The OS error behind an exception, also where a library reports one in its own type (safetensors'
    writer: "I/O error: File too large (os error 27)")."""
    if isinstance(e, OSError):
        return e
    found = OS_ERROR.search(str(e))
    return OSError(int(found[1]), os.strerror(int(found[1]))) if found else None


def os_fault(e: OSError, doing: str, path=None) -> MachineFault:
    """One line for an OS error: what was being done, the file, the reason and its errno name
    ("cannot write merged: No space left on device (ENOSPC)")."""
    where = path if path is not None else e.filename
    code = f" ({errno.errorcode[e.errno]})" if e.errno in errno.errorcode else ""
    return MachineFault(f"{doing}{f' {where}' if where is not None else ''}: {e.strerror or e}{code}")
