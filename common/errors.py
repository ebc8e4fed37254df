"""Error type for bad input data.

Every problem with a user-supplied data file is reported as a :class:`DataError`
that names the file and, where it applies, the 1-based physical line, so a CLI
can print ``str(err)`` as one actionable line instead of a numpy traceback.
"""

from __future__ import annotations

import os

__all__ = ["DataError", "plain_message"]


class DataError(ValueError):
    """Input data is missing or malformed.

    Subclasses ``ValueError`` so generic ``except ValueError`` handlers keep
    working. ``str(err)`` is always a single line:
    ``"{path}:{line}: {message}"``, ``"{path}: {message}"`` or ``"{message}"``.
    """

    def __init__(
        self,
        message: str,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
    ) -> None:
        # Newlines would break the one-line contract (e.g. a raw line quoted
        # in the message that ends in "\r"), so flatten them here once.
        self.message: str = " ".join(str(message).split("\n")).replace("\r", " ")
        self.path: str | None = os.fspath(path) if path is not None else None
        self.line: int | None = line
        super().__init__(self._format())

    def _format(self) -> str:
        if self.path is None:
            return self.message
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"

    def __str__(self) -> str:
        return self._format()

    def __reduce__(self):  # keep pickling (e.g. across Ray/Flower workers) intact
        return (type(self), (self.message, self.path, self.line))


def plain_message(err: Exception) -> str:
    """An exception's message as one would print it: ``str(KeyError("x"))`` adds quotes."""
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
