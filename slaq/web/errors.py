"""OpenAI's HTTP conventions, in one place: the error shape, retry headers, request ids.

Every failure answers ``{"error": {message, type, param, code}}``: views raise
:class:`ApiError`; :func:`register_error_handlers` turns it, admission refusals, Werkzeug's HTTP
errors (404, 405, 413, ...) and unexpected exceptions into that shape, so no client ever sees
HTML. Retryable refusals carry ``retry-after-ms``, ``retry-after`` and ``x-should-retry``, which
the openai client honours. :func:`install_conventions` echoes ``x-request-id``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from slaq.platform.admission import AdmissionError

log = logging.getLogger(__name__)

# Status → (type, code) for errors raised by Werkzeug or the server itself.
_HTTP_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("timeout_error", "timeout"),
    409: ("conflict_error", None),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
}


@dataclass(slots=True)
class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> Response:
        resp = jsonify(self.body())
        resp.status_code = self.status
        resp.headers.update(self.headers)
        return resp


def invalid_request(message: str, param: str | None = None,
                    code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def invalid_api_key(message: str = "Incorrect API key provided.") -> ApiError:
    return ApiError(401, message, "invalid_request_error", None, "invalid_api_key")


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist or you do not have access to it.",
                    "invalid_request_error", "model", "model_not_found")


def overloaded(message: str, retry_after_s: float | None = None) -> ApiError:
    """429 for work we will not queue now; the client retries after ``retry_after_s``."""
    headers = {}
    if retry_after_s is not None:
        headers = {"retry-after-ms": str(int(retry_after_s * 1000)),
                   "retry-after": str(max(1, round(retry_after_s))),
                   "x-should-retry": "true"}
    return ApiError(429, message, "rate_limit_error", None, "rate_limit_exceeded", headers)


def server_error(message: str, status: int = 500, code: str | None = None) -> ApiError:
    return ApiError(status, message, "server_error", None, code)


def from_http_exception(exc: HTTPException) -> ApiError:
    status = exc.code or 500
    type_, code = _HTTP_TYPES.get(status, ("invalid_request_error" if status < 500
                                           else "server_error", None))
    message = exc.description or exc.name
    return ApiError(status, message, type_, None, code)


def from_admission_error(exc: AdmissionError) -> ApiError:
    if exc.status == 429 or exc.retry_after_s is not None:
        error = overloaded(exc.message, exc.retry_after_s)
        error.status, error.type, error.code = exc.status, exc.type, exc.code
        return error
    return ApiError(exc.status, exc.message, exc.type, exc.param, exc.code)


def register_error_handlers(app: Flask) -> None:
    """Answer every error in OpenAI's shape."""

    @app.errorhandler(AdmissionError)
    def _admission_error(exc: AdmissionError) -> Response:
        return from_admission_error(exc).response()

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return exc.response()

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        resp = from_http_exception(exc).response()
        if exc.code == 405 and exc.valid_methods:
            resp.headers["Allow"] = ", ".join(exc.valid_methods)
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return server_error("The server had an error while processing your request.").response()


def install_conventions(app: Flask) -> None:
    """Echo the client's ``x-request-id`` (or make one up) and report processing time."""

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        g.request_id = request.headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"

    @app.after_request
    def _finish(resp: Response) -> Response:
        resp.headers["x-request-id"] = g.get("request_id") or f"req_{uuid.uuid4().hex}"
        started = g.get("started")
        if started is not None:
            resp.headers["openai-processing-ms"] = str(int((time.perf_counter() - started) * 1e3))
        return resp
