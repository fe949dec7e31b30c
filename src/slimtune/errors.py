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


class RequestError(TuningError):
    """A request the engine cannot serve as asked (bad setting, prompt too long, wrong kind of tuning);
    `param` names the setting that was wrong, where one was."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
