"""`UserError`: the mark of an error the user can fix (a busy workdir, a full disk, a bad config
or input file). The command-line entry points print its message without a traceback and exit
non-zero; every other exception is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the input or the environment, not by the code; its message says what to
    do. Subclasses also derive from the built-in type that fits (ValueError, OSError, ...), so
    callers catching those keep working."""
