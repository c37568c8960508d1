"""Errors a user can fix. The CLI prints them as one line and exits non-zero, never with a traceback."""


class UserError(Exception):
    """Bad input, a missing file or column, a model that does not match: something the user can fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty): the part of a library's
    error worth putting in a one-line ``UserError``."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
