"""The web console under ``/ui/``: server-rendered pages over the same use cases as the API.

Pages read jobs through ``service.jobs_api`` (``own_job``, ``cancel``, ``report_of``) and submit
through ``service.submission``, so a tenant sees and may do exactly what the API allows. Every
asset is served from here (``static/``, and Swagger UI's files for ``/docs``): nothing is loaded
from another origin.
"""

from __future__ import annotations

import hmac
import json
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    g,
    redirect,
    render_template,
    request,
    send_from_directory,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from marshmallow import ValidationError

from modelpress import jobs
from modelpress.config import Settings, persistent_secret
from service import artifacts_api, jobs_api
from service.auth import session_tenant, sign_in, sign_out
from service.console import form as spec_form, report as report_view
from service.console.charts import format_number
from service.problems import ApiProblem
from service.queue import enqueue_job
from service.schemas import JobListArgsSchema
from service.submission import Submission, invalid, submit

bp = Blueprint(
    "console",
    __name__,
    url_prefix="/ui",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
PAGE_SIZE = 20
FILE_PARTS = ("model", "data", "student", "callback_url")
# Same-origin only: scripts and styles from /ui/static, no inline script, nothing from elsewhere.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def console_init_app(app: Flask, settings: Settings) -> None:
    """Register the console, its session cookie and the local assets of ``/docs``."""
    app.secret_key = settings.secret_key or persistent_secret(settings.data_dir, "console-secret.key")
    app.config.update(
        SESSION_COOKIE_NAME="modelpress_console", SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict"
    )
    app.session_interface = _SessionInterface()
    app.register_blueprint(bp)
    app.add_url_rule("/", "home", lambda: redirect(url_for("console.jobs_list")))
    app.add_url_rule("/docs/assets/<path:filename>", "docs_assets", _docs_asset)
    app.add_url_rule(
        "/favicon.ico",
        "favicon",
        lambda: send_from_directory(Path(bp.static_folder), "favicon.svg", mimetype="image/svg+xml", max_age=86400),
    )


class _SessionInterface(SecureCookieSessionInterface):
    """The session cookie is ``Secure`` whenever the request came over https."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure or bool(app.config.get("SESSION_COOKIE_SECURE"))


def _docs_asset(filename: str) -> Response:
    """Swagger UI's files from the ``swagger-ui-bundle`` wheel (Apache-2.0), so /docs needs no CDN."""
    import swagger_ui_bundle

    return send_from_directory(swagger_ui_bundle.swagger_ui_path, filename, max_age=86400)


# ---------------------------------------------------------------------------- request guards


@bp.before_request
def _guard() -> Any:
    """Who is asking (the same tenant the API would see); not signed in: to the sign-in page. Forms need their token."""
    g.tenant = session_tenant()
    if request.endpoint in ("console.static", "console.sign_in"):
        return None
    if g.tenant is None:
        if request.endpoint in ("console.rows", "console.status"):
            abort(401)
        return redirect(url_for("console.sign_in", next=request.full_path.rstrip("?")))
    if request.method == "POST":
        _check_csrf()
    return None


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if response.mimetype == "text/html":
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.errorhandler(ApiProblem)
def _problem(problem: ApiProblem) -> tuple[str, int]:
    return render_template("console/error.html", problem=problem), problem.status


@bp.app_context_processor
def _template_globals() -> dict[str, Any]:
    return {
        "csrf_token": _csrf_token,
        "keys_on": current_app.extensions.get("modelpress_keys") is not None,
        "tenant": g.get("tenant"),
        "final_states": jobs.FINAL_STATES,
    }


bp.add_app_template_global(format_number, "number")  # globals reach imported macros too


def _csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def _check_csrf() -> None:
    sent = request.form.get("csrf_token", "")
    if not sent or not hmac.compare_digest(sent, session.get("csrf", "")):
        raise ApiProblem(
            400,
            "Bad Request",
            "the form has expired or did not come from this console; reload the page and send it again",
            slug="csrf-token",
        )


# ---------------------------------------------------------------------------- pages


@bp.get("/")
def jobs_list() -> str:
    query = _list_query()
    page, next_cursor = _page(**query)
    return render_template("console/list.html", jobs=page, next_cursor=next_cursor, states=jobs.STATES, **query)


@bp.get("/rows")
def rows() -> str:
    """The list's rows alone, for live updates."""
    page, _ = _page(**_list_query())
    return render_template("console/_rows.html", jobs=page)


@bp.route("/new", methods=["GET", "POST"])
def new_job() -> Any:
    tree = spec_form.controls()
    if request.method == "GET":
        return render_template("console/new.html", tree=tree, values=None, errors={}, problem=None)
    spec, errors = spec_form.spec_from_form(request.form, tree)
    problem = None
    if not errors:
        try:
            accepted = submit(
                Submission(
                    tenant=g.tenant,
                    model=_file("model"),
                    data=_file("data"),
                    student=_file("student"),
                    spec_text=spec if isinstance(spec, str) else json.dumps(spec),
                    callback_url=(request.form.get("callback_url") or "").strip() or None,
                    idempotency_key=None,
                    job_id=request.upload_job_id,
                ),  # the body is parsed: the files streamed under it
                current_app.extensions["modelpress"],
                current_app.extensions["modelpress_jobs"],
                current_app.extensions["modelpress_objects"],
                lambda job_id, *rest: enqueue_job(current_app, job_id, *rest),
            )
            return redirect(url_for("console.job_page", job_id=accepted.job["id"]), code=303)
        except ApiProblem as refused:
            errors, problem = refused.errors or {}, refused
    placed = spec_form.errors_by_control(errors, tree, FILE_PARTS + (spec_form.ADVANCED,))
    problem = problem or invalid(errors)
    # The page itself is fine (200): the refusal is its content. A 4xx document would make the browser log
    # "Failed to load resource" as a console error for an ordinary typo.
    return render_template("console/new.html", tree=tree, values=request.form, errors=placed, problem=problem)


@bp.get("/jobs/<job_id>")
def job_page(job_id: str) -> str:
    record = jobs_api.own_job(job_id)
    job = jobs.public_view(record)
    report = jobs_api.report_of(record) if job["state"] == jobs.SUCCEEDED else None
    artifacts = artifacts_api.artifact_list(record) if report is not None else []
    return render_template(
        "console/job.html",
        job=job,
        report=report,
        artifacts=artifacts,
        runtime_charts=report_view.runtime_charts(report, artifacts) if artifacts else [],
        sections=report_view.sections(report) if report else [],
        warnings=report_view.warnings_of(job, report),
    )


@bp.get("/jobs/<job_id>/status")
def status(job_id: str) -> str:
    """The job's live part alone (state, stage, progress), for live updates."""
    return render_template("console/_status.html", job=jobs.public_view(jobs_api.own_job(job_id)))


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Any:
    jobs_api.cancel(job_id)  # a job that finished meanwhile is left as it is (the API's DELETE would delete it)
    return redirect(url_for("console.job_page", job_id=job_id), code=303)


@bp.route("/sign-in", methods=["GET", "POST"], endpoint="sign_in")
def sign_in_page() -> Any:
    target = _safe_next(request.values.get("next"))
    if current_app.extensions.get("modelpress_keys") is None:
        return redirect(target)
    failed = False
    if request.method == "POST":
        _check_csrf()
        if sign_in(request.form.get("key", "")) is not None:
            return redirect(target, code=303)
        failed = True
    return render_template("console/sign_in.html", failed=failed, next=target)


@bp.post("/sign-out", endpoint="sign_out")
def sign_out_page() -> Any:
    sign_out()
    return redirect(
        url_for("console.sign_in")
        if current_app.extensions.get("modelpress_keys") is not None
        else url_for("console.jobs_list"),
        code=303,
    )


# ---------------------------------------------------------------------------- helpers


def _list_query() -> dict[str, str | None]:
    """``state`` and ``cursor`` checked by the API's own query schema."""
    raw = {key: request.args[key] for key in ("state", "cursor") if request.args.get(key)}
    try:
        query = JobListArgsSchema().load(raw)
    except ValidationError as error:
        raise invalid({key: [str(m) for m in messages] for key, messages in error.messages.items()}) from None
    return {"state": query.get("state"), "cursor": query.get("cursor")}


def _page(state: str | None, cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """The same listing as ``GET /v1/jobs``: the tenant's jobs, newest first."""
    page, next_cursor = current_app.extensions["modelpress_jobs"].page(
        g.tenant, state=state, limit=PAGE_SIZE, after=cursor
    )
    return [jobs.public_view(job) for job in page], next_cursor


def _file(name: str):
    """An uploaded part, or None when the file input was left empty (browsers send an empty part)."""
    part = request.files.get(name)
    return part if part is not None and part.filename else None


def _safe_next(target: str | None) -> str:
    """Only a path on this service (no scheme, no host): never an open redirect."""
    if (
        target
        and target.startswith("/")
        and not target.startswith("//")
        and not urlsplit(target).netloc
        and "\\" not in target
    ):
        return target
    return url_for("console.jobs_list")


__all__ = ["console_init_app"]
