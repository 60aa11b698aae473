"""The one error type users see: bad input, named precisely, exit status 2."""

from __future__ import annotations


class GazalError(Exception):
    """A problem with the user's input (recipe, data file, run directory).

    The CLI prints the message without a traceback and exits with status 2.
    """

    exit_code = 2


class TrainingStopped(GazalError):
    """A training monitor rule stopped the run; the message says which rule and why. Exit status 1."""

    exit_code = 1


class RecipeError(GazalError):
    """A recipe key that cannot run with the others; `key` is its dotted path, for the file and line."""

    def __init__(self, key: tuple[str, ...], message: str):
        super().__init__(message)
        self.key = key
