"""The submission use case, shared by ``POST /v1/jobs`` and the console's form: validate, keep the
uploads, check the archives and the data file, record the job (with its idempotency claim and quota
check, atomically), then send its message.

One rollback path: until the record exists, everything written belongs to this request and is
removed on any failure (``finally``); once the record exists the job is accepted, and a lost
message is the reconciler's to re-send (``workers/reaper.py``), so nothing is undone after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from werkzeug.datastructures import FileStorage

from modelpress import capacity, jobs
from modelpress.archive import ArchiveRejected, check_torchscript_archive
from modelpress.config import Settings
from modelpress.datafile import DataFileError, DataFileRefused, check_data_archive, disagreements, read_headers
from modelpress.fault_injection import fault_point
from modelpress.formats import EXPORTED, model_format
from modelpress.jobs import JobStore, new_job_id, utc_now
from modelpress.objectstore import ObjectStore
from modelpress.options import job_options
from modelpress.search_spec import target_conflicts
from modelpress.spec import SpecError, dump_spec, parse_spec
from modelpress.storage import write_json_atomic
from modelpress.webhooks import CallbackRefused, check_callback_url
from service.problems import ApiProblem
from service.uploads import UPLOAD_FIELDS, keep_upload, track_upload, upload_is_empty, upload_path

log = logging.getLogger("modelpress.api")
IDEMPOTENCY_TTL_S = 24 * 3600
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass(frozen=True)
class Submission:
    """What a client sent, as the view found it in the request."""

    tenant: str
    model: FileStorage | None
    data: FileStorage | None
    student: FileStorage | None
    spec_text: str | None
    callback_url: str | None
    idempotency_key: str | None
    job_id: str | None = None  # made when the files started streaming to the object store (``StreamingRequest``)


@dataclass(frozen=True)
class Accepted:
    job: dict[str, Any]
    replayed: bool = False


def submit(
    submission: Submission,
    settings: Settings,
    store: JobStore,
    objects: ObjectStore,
    enqueue: Callable[[str, int], None],
) -> Accepted:
    """Accept a job or raise ``ApiProblem`` (422, 409, 429); see the module's docstring."""
    job_id = submission.job_id or new_job_id()
    files = objects.storage.job(job_id)  # the request's files, local until kept (see ObjectStore.keep_inputs)
    recorded = False
    track_upload(store, job_id, active=True)  # settled below; a request killed before is the reaper's
    try:
        spec = _validate(submission, settings)
        infos = {}
        for part in UPLOAD_FIELDS:
            path = upload_path(files, part)
            upload = getattr(submission, part)
            if upload is None:
                infos[part] = None
                continue
            infos[part] = keep_upload(upload, path)
            if part == "data":
                try:  # an .npz is a zip: bounded like the model before anything parses its directory
                    check_data_archive(path, 2 * (settings.max_upload_mb << 20))
                except DataFileRefused as refused:
                    raise invalid({"data": [str(refused)]}) from None
            else:
                model_format_or_refusal = off_the_loop(_checked_format, path, settings)
                if isinstance(model_format_or_refusal, ArchiveRejected):
                    raise invalid({part: [str(model_format_or_refusal)]})
                infos[part]["format"] = model_format_or_refusal  # the job, its report and the download say it
        if infos["model"]["format"] != EXPORTED:
            for field, value, allowed in (
                ("spec.package", spec.get("package", "program"), "program"),
                ("spec.evaluation.runtime", spec["evaluation"]["runtime"], "eager"),
            ):
                if value != allowed:
                    raise invalid(
                        {
                            field: [
                                f"{value!r} applies to torch.export (.pt2) programs; a TorchScript "
                                f"model takes {allowed!r} (or leave it out)"
                            ]
                        }
                    )
        if infos["student"] is not None and infos["student"]["format"] != infos["model"]["format"]:
            raise invalid(
                {
                    "student": [
                        f"the student is a {infos['student']['format']} model and the teacher a "
                        f"{infos['model']['format']} one: upload both in the same format (a .pt2 "
                        "teacher trains a .pt2 student, which comes back as a .pt2)"
                    ]
                }
            )
        extra = sum(infos[part]["bytes"] for part in ("student", "data") if infos[part])
        too_big = infos["model"] and capacity.refusal(spec, infos["model"]["bytes"], extra, settings.job_memory_mb)
        if too_big:
            raise invalid({"model": [too_big]})
        if infos["data"] is not None:
            conflicts = off_the_loop(_data_conflicts, files.input_data, spec)
            if conflicts:
                raise invalid(conflicts)
        write_json_atomic(files.spec, dump_spec(spec))
        objects.keep_inputs(job_id)
        fault_point(
            "before-record", job_id, settings.data_dir
        )  # fault tests: the files are kept, the job not yet recorded
        job = {
            "id": job_id,
            "tenant": submission.tenant,
            "state": jobs.QUEUED,
            "progress": 0.0,
            "stage": "queued",
            "created_at": utc_now(),
            "started_at": None,
            "finished_at": None,
            "spec": dump_spec(spec),
            "input": infos["model"],
            "data": infos["data"],
            "student": infos["student"],
            "result": None,
            "error": None,
            "warnings": [],
            "callback_url": submission.callback_url,
        }
        idempotency = None
        fingerprint = None
        if submission.idempotency_key is not None:
            fingerprint = _fingerprint(
                spec, *[info and info["sha256"] for info in infos.values()], submission.callback_url
            )
            idempotency = (submission.tenant, submission.idempotency_key, fingerprint, IDEMPOTENCY_TTL_S)
        uploaded = sum(info["bytes"] for info in infos.values() if info)
        outcome, earlier = store.create(
            job, max_active=settings.max_active_jobs, uploaded_bytes=uploaded, idempotency=idempotency
        )
        recorded = outcome == "created"
    finally:
        if not recorded:
            objects.delete(job_id)  # the one rollback: this request's files, on every way out
        track_upload(store, job_id, active=False)
    if outcome == "replay":
        return _replay(store, earlier, fingerprint)
    if outcome == "quota":
        raise ApiProblem(
            429,
            "Too Many Requests",
            f"at most {settings.max_active_jobs} queued or running jobs per tenant "
            "(MODELPRESS_MAX_ACTIVE_JOBS); wait for some to finish",
            headers={"Retry-After": "30"},
        )
    fault_point("after-record", job_id, settings.data_dir)
    accepted = store.get(job_id) or job  # as accepted (queued): read after the send, a worker may have it already
    try:
        enqueue(job_id, 1)
    except Exception as error:  # accepted all the same: the record is durable and the reconciler re-sends
        log.warning(
            "job %s: message not sent (%s); the reconciler will send it", job_id, error, extra={"job_id": job_id}
        )
    return Accepted(accepted)


def invalid(errors: dict[str, list[str]]) -> ApiProblem:
    detail = "; ".join(f"{field}: {' '.join(messages)}" for field, messages in errors.items())
    return ApiProblem(422, "Unprocessable Content", detail, slug="validation-error", errors=errors)


def _validate(submission: Submission, settings: Settings) -> dict[str, Any]:
    errors: dict[str, list[str]] = {}
    if submission.model is None:
        errors["model"] = ["required: the TorchScript or torch.export (.pt2) file as the multipart part 'model'"]
    for name in ("model", "data", "student"):
        part = getattr(submission, name)
        if part is not None and upload_is_empty(part):
            errors[name] = ["the file is empty"]
    if submission.callback_url is not None:
        try:
            check_callback_url(submission.callback_url, settings.webhook_allow_private)
        except CallbackRefused as refused:
            errors["callback_url"] = [str(refused)]
    if submission.idempotency_key is not None and not _IDEMPOTENCY_KEY.match(submission.idempotency_key):
        errors["Idempotency-Key"] = ["1 to 255 printable ASCII characters"]
    spec: dict[str, Any] | None = None
    if submission.spec_text is None:
        errors["spec"] = ["required: the compression spec as JSON, in the multipart part 'spec'"]
    else:
        try:
            spec = parse_spec(
                submission.spec_text,
                has_data=submission.data is not None,
                has_student=submission.student is not None,
                max_time_limit_s=settings.job_timeout_s,
            )
        except SpecError as error:
            errors.update(error.errors)
    if errors:
        raise invalid(errors)
    return spec


def _replay(store: JobStore, earlier: dict[str, str], fingerprint: str | None) -> Accepted:
    if earlier["fingerprint"] != fingerprint:
        raise invalid({"Idempotency-Key": ["already used with a different request (within 24 hours)"]})
    job = store.get(earlier["job_id"])
    if job is None:
        raise ApiProblem(
            409,
            "Conflict",
            f"this Idempotency-Key was used for job {earlier['job_id']}, which has since been deleted; use a new key",
        )
    return Accepted(job, replayed=True)


def _fingerprint(spec: dict[str, Any], *parts: Any) -> str:
    """What makes two submissions the same request: the accepted spec, the files' digests, the callback."""
    canonical = json.dumps([dump_spec(spec), *parts], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def off_the_loop(call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)`` on a real OS thread when the API serves on gevent (modelpress/apiserver.py).

    A greenlet is never preempted: reading a large archive's directory, walking a .pt2's JSON or
    tokenizing a TorchScript model's code takes seconds, during which every other connection of
    that API process would wait. On an OS thread the interpreter switches between it and the event
    loop every few milliseconds, so the others are still served.
    """
    try:
        from gevent import get_hub, monkey
    except ImportError:
        return call(*args)
    if not monkey.is_module_patched("threading"):
        return call(*args)
    return get_hub().threadpool.apply(call, args)


def _checked_format(path: Path, settings: Settings) -> str | ArchiveRejected:
    """The uploaded model's format once its archive passed the checks, or why it was refused.

    The refusal is returned, not raised: gevent's thread pool prints every exception that leaves a
    thread as a traceback, which would put one in the API's log for each refused upload."""
    try:
        check_torchscript_archive(path, 2 * (settings.max_upload_mb << 20), settings.op_check == "on")
    except ArchiveRejected as rejected:
        return rejected
    return model_format(path)


def _data_conflicts(path: Any, spec: dict[str, Any]) -> dict[str, list[str]]:
    """Where the data file contradicts the declared inputs, from its headers; a file whose headers
    cannot be read is left to the job, which fails with the reason."""
    try:
        headers = read_headers(path)
        declared = job_options(spec)
        return {
            **disagreements(headers, declared.inputs, from_input_shape=declared.from_input_shape),
            **target_conflicts(spec, has_labels="labels" in headers),
        }
    except DataFileError:
        return {}
