"""The daemon's error kinds and the one table that maps them to HTTP statuses.

Every layer raises one of these; the server's error middleware (and the streaming helper,
once bytes are on the wire) turns them into `{"error": message}` with the status below.
Messages are the exact strings Ollama sends where a client may match on them.
"""

from __future__ import annotations


class DaemonError(Exception):
    """Base class: an error with a message meant for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(DaemonError):
    """The request is malformed or asks for something the model cannot do."""


class Unauthorized(DaemonError):
    """No API key, or one that is not among the daemon's keys."""


class NotFound(DaemonError):
    """The model (or blob) does not exist."""


class PayloadTooLarge(DaemonError):
    """A request body over the daemon's limit (blobs stream and have none)."""


class ModelDamaged(DaemonError):
    """The model exists but cannot be used: its manifest or files are damaged or missing.
    Unlike NotFound, handlers keep its message: it says what to do (delete, pull again)."""


class ServerBusy(DaemonError):
    """Too many requests are pending."""


class NotImplementedFeature(DaemonError):
    """A valid request for a feature this build does not have yet."""


class InternalError(DaemonError):
    """Anything that went wrong on our side, including options of the wrong type
    (Ollama answers those with 500 too)."""


class ModelTooLarge(DaemonError):
    """The model does not fit the memory budget even with everything else evicted."""


STATUS_BY_KIND: dict[type[DaemonError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    PayloadTooLarge: 413,
    InternalError: 500,
    ModelDamaged: 500,
    ModelTooLarge: 500,
    NotImplementedFeature: 501,
    ServerBusy: 503,
}


def status_of(error: BaseException) -> int:
    """HTTP status for any exception: the table for our kinds, 500 for the rest."""
    for kind in type(error).__mro__:
        if kind in STATUS_BY_KIND:
            return STATUS_BY_KIND[kind]
    return 500


def message_of(error: BaseException) -> str:
    if isinstance(error, DaemonError):
        return error.message
    return str(error) or type(error).__name__


# Ollama's exact texts, shared by several handlers.
SERVER_BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
