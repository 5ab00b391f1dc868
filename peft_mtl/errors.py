"""The one exception type for mistakes a user can fix (a flag, a file, a folder).

The ``peft-mtl`` command prints a :class:`UserError` as one line naming what to change and
exits 2; anything else is a bug and keeps its traceback. Each stage's error (a bad task file,
a config field, an adapter folder, ...) subclasses it, so callers can catch the stage's own
type. It subclasses ``ValueError`` because most of them are bad values, and code written
against the earlier ``ValueError``s keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; the message says what and where, in one line."""


class UnknownName(UserError, KeyError):
    """A name (task, loss, sampler, ...) that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
