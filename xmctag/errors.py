"""Errors a user can fix. The CLI prints them as one line and exits non-zero, never with a traceback."""


class UserError(Exception):
    """Bad input, a missing file or column, a model that does not match: something the user can fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty): the part of a library's
    error worth putting in a one-line ``UserError``."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class UnreadableFile(UserError):
    """A file that is there but that a library could not read (damaged, truncated, not what it should be).

    ``path``: the file; ``reason``: the library's message (one line). For callers that word the error in their own
    terms (a bundle says which of its files it was and that it should be re-exported)."""

    def __init__(self, message: str, path, reason: str):
        super().__init__(message)
        self.path, self.reason = path, reason
