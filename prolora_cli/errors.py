"""The exceptions the CLI turns into one line on stderr: UserError (exit code 2), VerificationFailed (1)."""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed record, an impossible setting."""


class VerificationFailed(Exception):
    """A written model does not reproduce base + adapter within the tolerance; nothing was written."""
