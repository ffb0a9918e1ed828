"""The ``/v1/jobs`` resource: submit, poll, list, download, report, cancel and delete."""

from __future__ import annotations

import re
from typing import Any

from flask import current_app, g, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint

from modelpress import jobs
from modelpress.cleanup import remove_job
from modelpress.formats import FILE_SUFFIX, TORCHSCRIPT
from modelpress.jobs import JobStore, public_view, utc_now
from modelpress.objectstore import ObjectStore
from modelpress.spec import MAX_SPEC_BYTES
from modelpress.webhooks import tenant_secret
from service.auth import require_tenant
from service.downloads import published_file_response
from service.problems import ApiProblem
from service.queue import enqueue_job
from service.schemas import (
    JobListArgsSchema,
    JobListSchema,
    JobSchema,
    JobSubmissionSchema,
    ProblemSchema,
    WebhookSecretSchema,
)
from service.submission import Submission, submit
from service.uploads import client_filename

blp = Blueprint("jobs", __name__, url_prefix="/v1/jobs", description="Compression jobs")
blp.before_request(require_tenant)

POLL_AFTER_S = 2
_JOB_ID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
PROBLEM = {"content_type": "application/problem+json", "schema": ProblemSchema}


@blp.route("")
class Jobs(MethodView):
    @blp.doc(
        requestBody={"required": True, "content": {"multipart/form-data": {"schema": JobSubmissionSchema}}},
        parameters=[
            {
                "in": "header",
                "name": "Idempotency-Key",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                "description": "Per tenant, for 24 hours: the same key with the same request returns the "
                "first job (header Idempotent-Replayed: true); with a different request, 422.",
            }
        ],
    )
    @blp.response(202, JobSchema, description="Accepted; poll the Location header.")
    @blp.alt_response(413, description="Upload too large", **PROBLEM)
    @blp.alt_response(415, description="Not multipart/form-data", **PROBLEM)
    @blp.alt_response(422, description="Invalid spec or files; `errors` names each field", **PROBLEM)
    @blp.alt_response(429, description="Too many active jobs for this tenant", **PROBLEM)
    def post(self) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Submit a model and a compression spec."""
        if request.mimetype != "multipart/form-data":
            raise ApiProblem(
                415,
                "Unsupported Media Type",
                "send multipart/form-data with a 'model' file part and a 'spec' JSON part",
            )
        submission = Submission(
            tenant=g.tenant,
            model=request.files.get("model"),
            data=request.files.get("data"),
            student=request.files.get("student"),
            spec_text=_spec_text(),
            callback_url=request.form.get("callback_url") or None,
            idempotency_key=request.headers.get("Idempotency-Key"),
            job_id=request.upload_job_id,
        )  # after the parts above: reading them parses the body
        accepted = submit(
            submission,
            current_app.extensions["modelpress"],
            _store(),
            objects(),
            lambda job_id, generation: enqueue_job(current_app, job_id, generation),
        )
        headers = {"Location": url_for("jobs.Job", job_id=accepted.job["id"])}
        if accepted.replayed:
            headers["Idempotent-Replayed"] = "true"
        return public_view(accepted.job), 202, headers

    @blp.arguments(JobListArgsSchema, location="query", as_kwargs=True)
    @blp.response(200, JobListSchema)
    def get(self, limit: int, state: str | None = None, cursor: str | None = None) -> dict[str, Any]:
        """List jobs, newest first (cursor pagination, optional state filter)."""
        page, next_cursor = _store().page(g.tenant, state=state, limit=limit, after=cursor)
        return {"jobs": [public_view(job) for job in page], "next_cursor": next_cursor}


@blp.route("/<job_id>")
class Job(MethodView):
    @blp.etag
    @blp.response(
        200,
        JobSchema,
        headers={
            "Retry-After": {
                "description": "Seconds until the next poll is useful (unfinished jobs)",
                "schema": {"type": "integer"},
            }
        },
    )
    @blp.alt_response(404, description="No such job", **PROBLEM)
    def get(self, job_id: str) -> Any:
        """Poll a job. Send the ETag back as If-None-Match: an unchanged job answers 304 with no body."""
        job = own_job(job_id)
        if job["state"] in jobs.FINAL_STATES:
            return public_view(job)
        return public_view(job), {"Retry-After": str(POLL_AFTER_S)}

    @blp.response(202, JobSchema, description="Cancellation accepted (queued or running job).")
    @blp.alt_response(204, description="A finished job and its files were deleted.")
    @blp.alt_response(404, description="No such job", **PROBLEM)
    def delete(self, job_id: str) -> Any:
        """Cancel a queued or running job, or delete a finished one with its files."""
        cancelled = cancel(job_id)
        if cancelled is not None:
            return public_view(cancelled), 202
        remove_job(_store(), objects(), job_id)  # a store away: the reaper removes the files later
        return "", 204


@blp.route("/<job_id>/model")
class JobModel(MethodView):
    @blp.response(200, description="The compressed TorchScript model.", content_type="application/octet-stream")
    @blp.alt_response(404, description="No such job", **PROBLEM)
    @blp.alt_response(409, description="The job has not succeeded", **PROBLEM)
    def get(self, job_id: str) -> Any:
        """Download the compressed model (ETag and X-Checksum-Sha256 are its SHA-256; gzip on request)."""
        job = succeeded_job(job_id)
        digest = job["result"]["sha256"]
        suffix = FILE_SUFFIX.get(job["result"].get("format", TORCHSCRIPT), ".pt")  # .pt2 in, .pt2 out
        download_name = f"{download_stem(job)}{suffix}"
        store = objects()
        path = store.storage.job(job_id).published_model(job.get("attempt"))
        return published_file_response(store, job_id, path, digest, download_name)


@blp.route("/<job_id>/report")
class JobReport(MethodView):
    @blp.response(200, description="The compression report (sizes, latency, fidelity, what changed).")
    @blp.alt_response(404, description="No such job", **PROBLEM)
    @blp.alt_response(409, description="The job has not succeeded (nor failed with a report)", **PROBLEM)
    def get(self, job_id: str) -> Any:
        """The job's report.json; a job that failed its target (``target-not-met``) has one listing its trials."""
        job = own_job(job_id)
        if job["state"] == jobs.FAILED:
            try:
                return report_of(job)
            except FileNotFoundError:
                pass  # failed without a report: answered like any unfinished job
        return report_of(succeeded_job(job_id))


# ---------------------------------------------------------------------------- helpers


def own_job(job_id: str) -> dict[str, Any]:
    """The caller's own job; another tenant's job is answered exactly like a missing one."""
    job = _store().get(job_id) if _JOB_ID.match(job_id) else None
    if job is None or job.get("tenant", "public") != g.tenant:
        raise ApiProblem(404, "Not Found", f"no job with id {job_id!r}")
    return job


def cancel(job_id: str) -> dict[str, Any] | None:
    """Cancel the caller's queued or running job and return it; None when it has already finished."""
    job = own_job(job_id)
    store = _store()
    if job["state"] == jobs.QUEUED:
        # The same fenced script as every final state: it also puts the webhook event in the outbox.
        if store.finish(job_id, jobs.CANCELLED, None, finished_at=utc_now(), stage="cancelled") == jobs.CANCELLED:
            return store.get(job_id)
        job = own_job(job_id)
    if job["state"] == jobs.RUNNING:
        store.update_if(job_id, [jobs.RUNNING], cancel_requested=True)
        return own_job(job_id)
    return None


def report_of(job: dict[str, Any]) -> dict[str, Any]:
    """The report.json of a succeeded job: the one its winning attempt published."""
    return objects().read_report(job["id"], job.get("attempt"))


def succeeded_job(job_id: str) -> dict[str, Any]:
    job = own_job(job_id)
    if job["state"] != jobs.SUCCEEDED:
        raise ApiProblem(
            409,
            "Conflict",
            f"the job is {job['state']}; the model and report exist once it has succeeded",
            slug="job-not-succeeded",
        )
    return job


def download_stem(job: dict[str, Any]) -> str:
    """The start of a download's file name: the upload's name without its suffix, then the method."""
    # Sanitized again: a record kept before names were sanitized at submit may hold a CR or LF.
    stem = client_filename((job.get("input") or {}).get("filename"), "model").rsplit(".", 1)[0] or "model"
    return f"{stem}.{job['spec']['method']}"


def _spec_text() -> str | None:
    if "spec" in request.form:
        return request.form["spec"]
    part = request.files.get("spec")
    if part is not None:
        return part.stream.read(MAX_SPEC_BYTES + 1).decode("utf-8", errors="replace")
    return None


def _store() -> JobStore:
    return current_app.extensions["modelpress_jobs"]


def objects() -> ObjectStore:
    return current_app.extensions["modelpress_objects"]


webhooks_blp = Blueprint("webhooks", __name__, url_prefix="/v1/webhook-secret", description="Webhook signing")
webhooks_blp.before_request(require_tenant)


@webhooks_blp.route("")
class WebhookSecret(MethodView):
    @webhooks_blp.response(200, WebhookSecretSchema)
    def get(self) -> dict[str, str]:
        """Your tenant's secret for verifying webhook signatures (Standard Webhooks, HMAC-SHA256)."""
        return {
            "secret": tenant_secret(current_app.extensions["modelpress"], g.tenant),
            "scheme": "standard-webhooks-v1",
        }
