"""Typed exceptions for broken preconditions, in one place.

Everything raised on purpose by dropfleet derives from `DropfleetError`, so a
caller can tell our refusals from bugs. Errors about untrusted bytes derive
from `WireFormatError` (a `ValueError`), so a server can reject a client reply
without catching everything.
"""


class DropfleetError(Exception):
    """Base class of every error dropfleet raises on purpose."""


class ConfigError(DropfleetError, ValueError):
    """A hyperparameter, setting or argument is out of its allowed range."""


class UnknownModelError(DropfleetError, KeyError):
    """A model id is not in the model registry."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "unknown model"


class InitSchemeError(DropfleetError, ValueError):
    """A seeded-init request cannot be served (unknown version, unknown layer)."""


class WireFormatError(DropfleetError, ValueError):
    """Bytes or a sparse model that do not describe a valid model."""


class PayloadTooLargeError(WireFormatError):
    """A payload exceeds the configured size limit."""


class BudgetError(DropfleetError, ValueError):
    """A device memory budget cannot hold even the smallest useful model."""


class DatasetError(DropfleetError, OSError):
    """A data set cannot be found or read."""


class RunFailedError(DropfleetError, RuntimeError):
    """A run cannot go on (e.g. too few devices answered too many rounds in a row)."""


class ReplyRejectedError(WireFormatError):
    """A client reply fails validation; the server drops it and counts it."""


class FlowerControlError(DropfleetError, RuntimeError):
    """A Flower CLI call (start, stop, list) failed or could not be parsed."""


class StaleWriterError(DropfleetError, RuntimeError):
    """A ServerApp tried to publish a round for a run that another attempt has taken over."""


class OutOfSyncError(WireFormatError):
    """A device does not hold the model version an update starts from (it needs a resync)."""


class StoreUnavailableError(DropfleetError, RuntimeError):
    """The store stayed locked, full or unreachable through every retry; nothing was written."""
