"""``/v1/jobs/<id>/artifacts``: the export-target artifacts of a succeeded job (issue 25).

A spec's ``targets`` ask for the same compressed model in other formats (``modelpress.targets``).
The worker publishes each artifact that succeeded beside the model, measures its bytes and SHA-256
itself and records them in the job's ``result.targets``; the rest of each entry (runtime, precision,
latency) is the job's own word from its checked report. Downloads are served exactly like ``/model``.
"""

from __future__ import annotations

from typing import Any

from flask import url_for
from flask.views import MethodView
from flask_smorest import Blueprint

from modelpress.targets import TARGETS
from service.auth import require_tenant
from service.downloads import published_file_response
from service.jobs_api import PROBLEM, download_stem, objects, report_of, succeeded_job
from service.problems import ApiProblem
from service.schemas import ArtifactListSchema

blp = Blueprint("artifacts", __name__, url_prefix="/v1/jobs", description="Export-target artifacts")
blp.before_request(require_tenant)

_REPORTED = ("format", "runtime", "precision", "latency_ms", "latency_ratio")  # the job's word, checked by the worker


@blp.route("/<job_id>/artifacts")
class JobArtifacts(MethodView):
    @blp.response(200, ArtifactListSchema)
    @blp.alt_response(404, description="No such job", **PROBLEM)
    @blp.alt_response(409, description="The job has not succeeded", **PROBLEM)
    def get(self, job_id: str) -> dict[str, Any]:
        """The artifacts of each target in spec.targets: made (with a download link) or failed (with why)."""
        return {"artifacts": artifact_list(succeeded_job(job_id))}


@blp.route("/<job_id>/artifacts/<name>")
class JobArtifact(MethodView):
    @blp.response(
        200,
        description="The artifact's file (headers as for /model: ETag and X-Checksum-Sha256 are its "
        "SHA-256, Range, gzip on request).",
        content_type="application/octet-stream",
    )
    @blp.alt_response(
        404,
        description="No such job, or the job has no such artifact (not asked for, or failed: the detail says which)",
        **PROBLEM,
    )
    @blp.alt_response(409, description="The job has not succeeded", **PROBLEM)
    def get(self, job_id: str, name: str) -> Any:
        """Download one target's artifact (model.onnx, model.openvino.zip, model.pte)."""
        job = succeeded_job(job_id)
        reported = _reported(job)
        if name not in reported:
            asked = ", ".join(reported) or "none"
            raise ApiProblem(
                404,
                "Not Found",
                f"the job did not ask for target {name[:40]!r} (its spec.targets: {asked})",
                slug="artifact-not-found",
            )
        artifact = _artifact(job, name, reported[name])
        if artifact["status"] != "succeeded":
            raise ApiProblem(
                404,
                "Not Found",
                f"target {name!r} failed, so it has no artifact: {artifact['reason']}",
                slug="artifact-not-found",
            )
        target = TARGETS[name]
        store = objects()
        path = store.storage.job(job_id).published_artifact(job.get("attempt"), target.file_name)
        download_name = f"{download_stem(job)}.{target.file_name.removeprefix('model.')}"  # net.quantize.onnx
        return published_file_response(store, job_id, path, artifact["sha256"], download_name, target.media_type)


def artifact_list(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A succeeded job's artifacts as the API lists them (the console's job page shows the same)."""
    return [_artifact(job, name, entry) for name, entry in _reported(job).items()]


def _reported(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target the spec asked for, in its order, with its entry in the published report (``{}`` if none)."""
    asked = [name for name in (job.get("spec") or {}).get("targets") or [] if name in TARGETS]
    if not asked:
        return {}
    try:
        section = report_of(job).get("targets") or {}
    except FileNotFoundError:  # removed between the record read and now (DELETE, retention)
        raise ApiProblem(404, "Not Found", f"no job with id {job['id']!r}") from None
    return {name: section.get(name) if isinstance(section.get(name), dict) else {} for name in asked}


def _artifact(job: dict[str, Any], name: str, entry: dict[str, Any]) -> dict[str, Any]:
    # The record is the authority on what was published: the worker wrote its bytes and SHA-256 there.
    summary = ((job.get("result") or {}).get("targets") or {}).get(name) or {}
    made = summary.get("status") == "succeeded" and bool(summary.get("sha256"))
    artifact = {
        "name": name,
        "status": "succeeded" if made else "failed",
        "file": TARGETS[name].file_name if made else None,
        "bytes": summary.get("bytes") if made else None,
        "sha256": summary.get("sha256") if made else None,
        **{key: entry.get(key) for key in _REPORTED},
        "reason": None,
        "href": None,
    }
    if made:
        artifact["href"] = url_for("artifacts.JobArtifact", job_id=job["id"], name=name)
    else:
        artifact["reason"] = entry.get("reason") or (
            "the job's report does not mention it (its export did not run)" if not entry else "its export failed"
        )
    artifact["format"] = artifact["format"] or TARGETS[name].format
    return artifact
