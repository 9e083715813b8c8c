"""The one exception type the CLI turns into a single line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed record, an impossible setting."""
