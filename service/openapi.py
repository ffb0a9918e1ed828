"""flask-smorest's Api, answering every error as problem+json."""

from __future__ import annotations

import logging

import redis
from flask_smorest import Api
from werkzeug.exceptions import HTTPException, InternalServerError

from modelpress.objectstore import StoreUnavailable
from service.problems import ApiProblem, from_api_problem, from_http_exception, problem_response

log = logging.getLogger("modelpress.api")


class ProblemApi(Api):
    def _register_error_handlers(self) -> None:
        self._app.register_error_handler(HTTPException, self.handle_http_exception)
        self._app.register_error_handler(ApiProblem, from_api_problem)
        self._app.register_error_handler(redis.ConnectionError, _redis_away)
        self._app.register_error_handler(redis.TimeoutError, _redis_away)
        self._app.register_error_handler(StoreUnavailable, _store_away)
        self._app.register_error_handler(Exception, _unexpected)

    def handle_http_exception(self, error: HTTPException):  # type: ignore[override]
        if isinstance(error, InternalServerError):
            return _unexpected(error.original_exception or error)
        return from_http_exception(error)


def _unexpected(error: BaseException):
    log.exception("unexpected error", exc_info=error)
    return problem_response(500, "Internal Server Error", "the service failed unexpectedly; the error was logged")


def _redis_away(error: BaseException):
    """Redis restarting or unreachable (its clients time out within seconds): retry, nothing was accepted."""
    log.warning("Redis unreachable: %s", error)
    return problem_response(
        503,
        "Service Unavailable",
        "the job store is unreachable (restarting?); retry shortly",
        headers={"Retry-After": "2"},
    )


def _store_away(error: BaseException):
    """The object store unreachable or refusing: retry; a submission was not accepted."""
    log.warning("object store unavailable: %s", error)
    return problem_response(
        503, "Service Unavailable", "the object store is unreachable; retry shortly", headers={"Retry-After": "5"}
    )
