"""Errors as ``application/problem+json`` (RFC 9457), made in this one place."""

from __future__ import annotations

from typing import Any

from flask import Response, json
from werkzeug.exceptions import HTTPException

PROBLEM_TYPE_BASE = "https://modelpress.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class ApiProblem(Exception):
    """Raise from a view to answer with a problem document."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        slug: str | None = None,
        errors: dict[str, list[str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.slug = slug or title.lower().replace(" ", "-")
        self.errors = errors
        self.headers = headers or {}


def problem_response(
    status: int,
    title: str,
    detail: str,
    slug: str | None = None,
    errors: dict[str, list[str]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + (slug or title.lower().replace(" ", "-")),
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = errors
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_MEDIA_TYPE)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def from_api_problem(problem: ApiProblem) -> Response:
    return problem_response(
        problem.status, problem.title, problem.detail, problem.slug, problem.errors, problem.headers
    )


def from_http_exception(error: HTTPException) -> Response:
    """Werkzeug's and flask-smorest's errors (404, 405, 413, webargs' 422) as problem documents."""
    status = error.code or 500
    data = getattr(error, "data", None) or {}
    errors = data.get("errors") or data.get("messages")
    flat = _flatten_locations(errors) if isinstance(errors, dict) else None
    detail = data.get("message") or error.description or error.name
    if status == 413:
        detail = "the upload is larger than the service accepts (MODELPRESS_MAX_UPLOAD_MB)"
    if status == 422 and flat:
        detail = "; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in flat.items())
    headers = {name: value for name, value in error.get_headers() if name.lower() in ("allow", "retry-after")}
    return problem_response(status, error.name, str(detail), errors=flat, headers=headers)


def _flatten_locations(errors: dict[str, Any]) -> dict[str, list[str]]:
    """webargs nests errors by location (``{"query": {"limit": [...]}}``); name the field alone."""
    flat: dict[str, list[str]] = {}
    for location, fields in errors.items():
        if isinstance(fields, dict):
            for field, messages in fields.items():
                flat[str(field)] = [str(m) for m in (messages if isinstance(messages, list) else [messages])]
        else:
            flat[str(location)] = [str(m) for m in (fields if isinstance(fields, list) else [fields])]
    return flat
