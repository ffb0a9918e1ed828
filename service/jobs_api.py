"""The ``/v1/jobs`` resource: submit, poll, list, download, report, cancel and delete."""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from flask import current_app, g, request, send_file, url_for
from flask.views import MethodView
from flask_smorest import Blueprint

from modelpress import jobs
from modelpress.archive import ArchiveRejected, check_torchscript_archive
from modelpress.formats import FILE_SUFFIX, TORCHSCRIPT, model_format
from modelpress.jobs import JobStore, new_job_id, public_view, utc_now
from modelpress.spec import MAX_SPEC_BYTES, SpecError, dump_spec, parse_spec
from modelpress.storage import Storage, read_json, write_json_atomic
from service.auth import require_tenant
from service.problems import ApiProblem
from modelpress.webhooks import CallbackRefused, check_callback_url, tenant_secret
from service.queue import enqueue_job
from workers.celery_app import announce_final
from service.schemas import (JobListArgsSchema, JobListSchema, JobSchema, JobSubmissionSchema, ProblemSchema,
                             WebhookSecretSchema)
from service.uploads import gzip_copy, keep_upload, upload_is_empty

blp = Blueprint("jobs", __name__, url_prefix="/v1/jobs", description="Compression jobs")
blp.before_request(require_tenant)

POLL_AFTER_S = 2
IDEMPOTENCY_TTL_S = 24 * 3600
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_JOB_ID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
_PROBLEM = {"content_type": "application/problem+json", "schema": ProblemSchema}


@blp.route("")
class Jobs(MethodView):
    @blp.doc(requestBody={"required": True, "content": {"multipart/form-data": {"schema": JobSubmissionSchema}}},
             parameters=[{"in": "header", "name": "Idempotency-Key", "required": False, "schema": {"type": "string",
                          "minLength": 1, "maxLength": 255},
                          "description": "Per tenant, for 24 hours: the same key with the same request returns the "
                                         "first job (header Idempotent-Replayed: true); with a different request, 422."}])
    @blp.response(202, JobSchema, description="Accepted; poll the Location header.")
    @blp.alt_response(413, description="Upload too large", **_PROBLEM)
    @blp.alt_response(415, description="Not multipart/form-data", **_PROBLEM)
    @blp.alt_response(422, description="Invalid spec or files; `errors` names each field", **_PROBLEM)
    @blp.alt_response(429, description="Too many active jobs for this tenant", **_PROBLEM)
    def post(self) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Submit a model and a compression spec."""
        if request.mimetype != "multipart/form-data":
            raise ApiProblem(415, "Unsupported Media Type",
                             "send multipart/form-data with a 'model' file part and a 'spec' JSON part")
        model = request.files.get("model")
        data = request.files.get("data")
        student = request.files.get("student")
        errors: dict[str, list[str]] = {}
        if model is None:
            errors["model"] = ["required: the TorchScript file as the multipart part 'model'"]
        for name, part in (("model", model), ("data", data), ("student", student)):
            if part is not None and upload_is_empty(part):
                errors[name] = ["the file is empty"]
        callback_url = request.form.get("callback_url") or None
        if callback_url is not None:
            try:
                check_callback_url(callback_url, current_app.extensions["modelpress"].webhook_allow_private)
            except CallbackRefused as refused:
                errors["callback_url"] = [str(refused)]
        idempotency_key = request.headers.get("Idempotency-Key")
        if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
            errors["Idempotency-Key"] = ["1 to 255 printable ASCII characters"]
        spec: dict[str, Any] | None = None
        raw_spec = _spec_text()
        if raw_spec is None:
            errors["spec"] = ["required: the compression spec as JSON, in the multipart part 'spec'"]
        else:
            try:
                spec = parse_spec(raw_spec, has_data=data is not None, has_student=student is not None)
            except SpecError as error:
                errors.update(error.errors)
        if errors:
            raise _invalid(errors)

        storage = _storage()
        job_id = new_job_id()
        files = storage.job(job_id)
        part = "model"
        try:
            model_info = keep_upload(model, files.input_model)
            check_torchscript_archive(files.input_model, _max_expansion())
            model_info["format"] = model_format(files.input_model)
            student_info = None
            if student is not None:
                part = "student"
                student_info = keep_upload(student, files.input_student)
                check_torchscript_archive(files.input_student, _max_expansion())
                if model_format(files.input_student) != TORCHSCRIPT:
                    raise ArchiveRejected("a .pt2 student is not supported yet; upload the student as TorchScript")
            data_info = keep_upload(data, files.input_data) if data is not None else None
        except ArchiveRejected as rejected:
            storage.delete(job_id)
            raise _invalid({part: [str(rejected)]}) from None
        except BaseException:
            storage.delete(job_id)
            raise
        if idempotency_key is not None:
            fingerprint = _fingerprint(spec, *[info and info["sha256"] for info in (model_info, data_info, student_info)],
                                       callback_url)
            previous = _store().remember_request(g.tenant, idempotency_key, fingerprint, job_id, IDEMPOTENCY_TTL_S)
            if previous is not None:
                storage.delete(job_id)
                earlier = _store().get(previous["job_id"])
                if previous["fingerprint"] != fingerprint:
                    raise _invalid({"Idempotency-Key": ["already used with a different request (within 24 hours)"]})
                if earlier is None:
                    raise ApiProblem(409, "Conflict", "a request with this Idempotency-Key is still being "
                                     "processed; retry shortly", headers={"Retry-After": "1"})
                return public_view(earlier), 202, {"Location": url_for("jobs.Job", job_id=earlier["id"]),
                                                   "Idempotent-Replayed": "true"}
        write_json_atomic(files.spec, dump_spec(spec))
        job = {
            "id": job_id, "tenant": g.tenant, "state": jobs.QUEUED, "progress": 0.0, "stage": "queued",
            "created_at": utc_now(), "started_at": None, "finished_at": None,
            "spec": dump_spec(spec), "input": model_info, "data": data_info, "student": student_info,
            "result": None, "error": None, "callback_url": callback_url,
        }
        settings = current_app.extensions["modelpress"]
        uploaded = sum(info["bytes"] for info in (model_info, data_info, student_info) if info)
        if not _store().create(job, max_active=settings.max_active_jobs, uploaded_bytes=uploaded):
            storage.delete(job_id)
            if idempotency_key is not None:
                _store().forget_request(g.tenant, idempotency_key)
            raise ApiProblem(429, "Too Many Requests",
                             f"at most {settings.max_active_jobs} queued or running jobs per tenant "
                             "(MODELPRESS_MAX_ACTIVE_JOBS); wait for some to finish", headers={"Retry-After": "30"})
        try:
            enqueue_job(current_app, job_id)
        except Exception:
            # Not accepted after all: the client is told to retry, so nothing is kept.
            _store().delete(job_id)
            storage.delete(job_id)
            if idempotency_key is not None:
                _store().forget_request(g.tenant, idempotency_key)
            raise ApiProblem(503, "Service Unavailable", "the job queue is unavailable; try again shortly",
                             headers={"Retry-After": "5"}) from None
        location = url_for("jobs.Job", job_id=job_id)
        return public_view(job), 202, {"Location": location}

    @blp.arguments(JobListArgsSchema, location="query", as_kwargs=True)
    @blp.response(200, JobListSchema)
    def get(self, limit: int, state: str | None = None, cursor: str | None = None) -> dict[str, Any]:
        """List jobs, newest first (cursor pagination, optional state filter)."""
        page, next_cursor = _store().page(g.tenant, state=state, limit=limit, after=cursor)
        return {"jobs": [public_view(job) for job in page], "next_cursor": next_cursor}


@blp.route("/<job_id>")
class Job(MethodView):
    @blp.etag
    @blp.response(200, JobSchema, headers={"Retry-After": {"description": "Seconds until the next poll is useful "
                                                                          "(unfinished jobs)", "schema": {"type": "integer"}}})
    @blp.alt_response(404, description="No such job", **_PROBLEM)
    def get(self, job_id: str) -> Any:
        """Poll a job. Send the ETag back as If-None-Match: an unchanged job answers 304 with no body."""
        job = _job_or_404(job_id)
        if job["state"] in jobs.FINAL_STATES:
            return public_view(job)
        return public_view(job), {"Retry-After": str(POLL_AFTER_S)}

    @blp.response(202, JobSchema, description="Cancellation accepted (queued or running job).")
    @blp.alt_response(204, description="A finished job and its files were deleted.")
    @blp.alt_response(404, description="No such job", **_PROBLEM)
    def delete(self, job_id: str) -> Any:
        """Cancel a queued or running job, or delete a finished one with its files."""
        job = _job_or_404(job_id)
        store = _store()
        if job["state"] == jobs.QUEUED:
            if store.move(job_id, jobs.CANCELLED, finished_at=utc_now(), stage="cancelled") == jobs.CANCELLED:
                cancelled = store.get(job_id)
                announce_final(current_app.extensions["celery"], cancelled)
                return public_view(cancelled), 202
            job = _job_or_404(job_id)
        if job["state"] == jobs.RUNNING:
            store.update_if(job_id, [jobs.RUNNING], cancel_requested=True)
            return public_view(_job_or_404(job_id)), 202
        store.delete(job_id)
        _storage().delete(job_id)
        return "", 204


@blp.route("/<job_id>/model")
class JobModel(MethodView):
    @blp.response(200, description="The compressed TorchScript model.",
                  content_type="application/octet-stream")
    @blp.alt_response(404, description="No such job", **_PROBLEM)
    @blp.alt_response(409, description="The job has not succeeded", **_PROBLEM)
    def get(self, job_id: str) -> Any:
        """Download the compressed model (ETag and X-Checksum-Sha256 are its SHA-256; gzip on request)."""
        job = _succeeded_or_409(job_id)
        path = _storage().job(job_id).output_model
        digest = job["result"]["sha256"]
        stem = (job.get("input") or {}).get("filename", "model").rsplit(".", 1)[0] or "model"
        suffix = FILE_SUFFIX.get(job["result"].get("format", TORCHSCRIPT), ".pt")  # .pt2 in, .pt2 out
        gzipped = "gzip" in request.accept_encodings
        response = send_file(gzip_copy(path) if gzipped else path, mimetype="application/octet-stream",
                             as_attachment=True, download_name=f"{stem}.{job['spec']['method']}{suffix}",
                             etag=f"{digest}-gzip" if gzipped else digest, conditional=True, max_age=0)
        if gzipped:
            response.headers["Content-Encoding"] = "gzip"
        response.headers["Vary"] = "Accept-Encoding"
        response.headers["X-Checksum-Sha256"] = digest  # of the model itself, after any decoding
        return response


@blp.route("/<job_id>/report")
class JobReport(MethodView):
    @blp.response(200, description="The compression report (sizes, latency, fidelity, what changed).")
    @blp.alt_response(404, description="No such job", **_PROBLEM)
    @blp.alt_response(409, description="The job has not succeeded", **_PROBLEM)
    def get(self, job_id: str) -> Any:
        """The job's report.json."""
        _succeeded_or_409(job_id)
        return read_json(_storage().job(job_id).report)


# ---------------------------------------------------------------------------- helpers


def _job_or_404(job_id: str) -> dict[str, Any]:
    """The caller's own job; another tenant's job is answered exactly like a missing one."""
    job = _store().get(job_id) if _JOB_ID.match(job_id) else None
    if job is None or job.get("tenant", "public") != g.tenant:
        raise ApiProblem(404, "Not Found", f"no job with id {job_id!r}")
    return job


def _succeeded_or_409(job_id: str) -> dict[str, Any]:
    job = _job_or_404(job_id)
    if job["state"] != jobs.SUCCEEDED:
        raise ApiProblem(409, "Conflict", f"the job is {job['state']}; the model and report exist once it has succeeded",
                         slug="job-not-succeeded")
    return job


def _fingerprint(spec: dict[str, Any], *parts: Any) -> str:
    """What makes two submissions the same request: the accepted spec, the files' digests, the callback."""
    canonical = json.dumps([dump_spec(spec), *parts], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _spec_text() -> str | None:
    if "spec" in request.form:
        return request.form["spec"]
    part = request.files.get("spec")
    if part is not None:
        return part.stream.read(MAX_SPEC_BYTES + 1).decode("utf-8", errors="replace")
    return None


def _invalid(errors: dict[str, list[str]]) -> ApiProblem:
    detail = "; ".join(f"{field}: {' '.join(messages)}" for field, messages in errors.items())
    return ApiProblem(422, "Unprocessable Content", detail, slug="validation-error", errors=errors)


def _max_expansion() -> int:
    """An archive may declare at most twice the upload limit (TorchScript entries are stored, not deflated)."""
    return 2 * (current_app.extensions["modelpress"].max_upload_mb << 20)


def _store() -> JobStore:
    return current_app.extensions["modelpress_jobs"]


def _storage() -> Storage:
    return current_app.extensions["modelpress_storage"]


webhooks_blp = Blueprint("webhooks", __name__, url_prefix="/v1/webhook-secret", description="Webhook signing")
webhooks_blp.before_request(require_tenant)


@webhooks_blp.route("")
class WebhookSecret(MethodView):
    @webhooks_blp.response(200, WebhookSecretSchema)
    def get(self) -> dict[str, str]:
        """Your tenant's secret for verifying webhook signatures (Standard Webhooks, HMAC-SHA256)."""
        return {"secret": tenant_secret(current_app.extensions["modelpress"], g.tenant), "scheme": "standard-webhooks-v1"}
