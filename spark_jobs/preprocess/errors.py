"""The job's two failures and its exit statuses; both are permanent engine errors (a rerun with the
same input fails the same way)."""
from __future__ import annotations

from lottery.errors import PermanentError

EXIT_OK, EXIT_DATA, EXIT_USAGE = 0, 1, 2


class InputError(PermanentError):
    """Bad arguments, input root or output path: nothing was written (exit 2)."""


class DataError(PermanentError):
    """The data failed a check (bad-file threshold, empty class, mixed sizes): exit 1."""
