"""Errors a user can fix. The CLI prints them as one line and exits non-zero, never with a traceback."""


class UserError(Exception):
    """Bad input, a missing file or column, a model that does not match: something the user can fix."""
