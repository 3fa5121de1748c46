"""Every error Woolly raises carries one of the API's error codes.

The HTTP layer maps `code` to a status in one table; nothing else decides a status.
"""
from __future__ import annotations


class WoollyError(Exception):
    """Base error: `code` is the API error code, `details` is JSON-safe context."""

    code = "INTERNAL_ERROR"

    def __init__(self, message: str, *, details: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code is not None:
            self.code = code

    def __str__(self) -> str:  # one clear line, no traceback needed
        return self.message


class ModelNotFound(WoollyError):
    code = "MODEL_NOT_FOUND"


class ModelLoadFailed(WoollyError):
    code = "MODEL_LOAD_FAILED"


class InvalidRequest(WoollyError):
    code = "INVALID_REQUEST"


class OutOfMemory(WoollyError):
    code = "OUT_OF_MEMORY"


class GpuError(WoollyError):
    code = "GPU_ERROR"


class ModelNotLoaded(WoollyError):
    code = "MODEL_NOT_LOADED"


class GenerationFailed(WoollyError):
    code = "GENERATION_FAILED"


class TokenizerError(WoollyError):
    code = "TOKENIZER_ERROR"


class ContextLengthExceeded(InvalidRequest):
    """A prompt longer than the context: an invalid request (a 400) with its own code."""

    code = "CONTEXT_LENGTH_EXCEEDED"


class Unauthorized(WoollyError):
    code = "UNAUTHORIZED"


class RateLimited(WoollyError):
    code = "RATE_LIMITED"


class ServerBusy(WoollyError):
    """Every slot is busy and the queue is full: try again later."""

    code = "SERVER_BUSY"


class InternalError(WoollyError):
    code = "INTERNAL_ERROR"


# The reference's status table: the one place an error code becomes an HTTP status.
HTTP_STATUS = {
    "MODEL_NOT_FOUND": 404,
    "MODEL_NOT_LOADED": 400,
    "MODEL_LOAD_FAILED": 500,
    "INVALID_REQUEST": 400,
    "CONTEXT_LENGTH_EXCEEDED": 400,
    "GENERATION_FAILED": 500,
    "OUT_OF_MEMORY": 507,
    "GPU_ERROR": 500,
    "TOKENIZER_ERROR": 500,
    "RATE_LIMITED": 429,
    "UNAUTHORIZED": 401,
    "INTERNAL_ERROR": 500,
    "SERVER_BUSY": 503,   # beyond the reference's table: a full queue, distinct from rate limits
}
