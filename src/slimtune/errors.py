"""Errors that say what was wrong and what was expected."""


class TuningError(ValueError):
    """A tuning does not fit: bad configuration, wrong model, unknown user, unreadable file."""


class TuningFileError(TuningError):
    """A saved tuning is missing, corrupt, truncated or of an unknown format."""


class ModelMismatchError(TuningError):
    """A tuning was made for a model of another type or shape."""


class UnknownUserError(TuningError, KeyError):
    """A bank was asked for a user it does not hold."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])
