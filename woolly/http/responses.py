"""The error answers every route can give, documented in the OpenAPI schema with their real shape.

Without this, Litestar documents its own `{"status_code", "detail", "extra"}` body for a 400,
while every error the server sends is `{"error": {message, code, details}}`: a client
generated from /schema/openapi.json (or schemathesis) would reject each real error.
"""
from __future__ import annotations

from litestar.openapi.datastructures import ResponseSpec

from woolly.http.schemas import ErrorResponse

_ERRORS = {
    400: "Invalid request (INVALID_REQUEST, CONTEXT_LENGTH_EXCEEDED, MODEL_NOT_LOADED, ...)",
    401: "Missing or invalid API key (UNAUTHORIZED)",
    403: "A web page's Origin that CORS does not allow (UNAUTHORIZED)",
    404: "Unknown route or model (NOT_FOUND, MODEL_NOT_FOUND)",
    413: "Body over the size limit (PAYLOAD_TOO_LARGE)",
    415: "A request body that is not application/json (INVALID_REQUEST)",
    429: "Rate limited (RATE_LIMITED), with Retry-After",
    431: "Too many or too large request headers",
    500: "Internal or model-load error (INTERNAL_ERROR, MODEL_LOAD_FAILED, ...)",
    503: "Every slot busy and the queue full, or every loaded model busy (SERVER_BUSY)",
}

ERROR_RESPONSES: dict[int, ResponseSpec] = {
    status: ResponseSpec(data_container=ErrorResponse, description=description, generate_examples=False)
    for status, description in _ERRORS.items()
}
