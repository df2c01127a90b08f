"""Data errors that say what was wrong and how to fix it."""


class DataError(RuntimeError):
    """A data set is missing, corrupt or malformed."""
