"""The error a task loader raises for data it cannot use."""


class DataError(ValueError):
    """A task's data is unreadable or does not fit: unknown task, empty file, missing column, bad line, unknown
    label. The message names the file and line where there is one, and says what was expected."""
