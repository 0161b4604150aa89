"""Exceptions raised by blue_plugin.

Every error a user can fix is a :class:`ValueError` subclass whose message says what to change.
"""


class BLUEConfigError(ValueError):
    """A hyperparameter file or object is invalid (unknown key, wrong type, bad value)."""


class BLUERequestError(ValueError):
    """An edit request is malformed (missing prompt, subject not in prompt, empty target...)."""


class BLUEEditError(ValueError):
    """An edit could not be applied safely (non-finite values, shape mismatch).

    When this is raised the model and the sequential state are exactly as before the batch.
    """


class BLUEStatisticsError(ValueError):
    """A statistics file is refused (unreadable, pickled, projection, count, shape, finite, symmetry...).

    ``check`` names the check that failed; the message says why and what to do instead.
    """

    def __init__(self, message: str, check: str = ""):
        super().__init__(message)
        self.check = check
