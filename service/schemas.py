"""Response and query schemas of the API; the OpenAPI document is generated from them."""

from __future__ import annotations

from typing import Any

from flask_smorest.fields import Upload
from marshmallow import Schema, fields, validate

from modelpress import jobs
from modelpress.spec import CompressionSpec


class FileInfoSchema(Schema):
    filename = fields.String()
    bytes = fields.Integer()
    sha256 = fields.String()
    format = fields.String(
        metadata={"description": "torchscript or pt2 (a torch.export program), from the file's layout."}
    )


class ResultSchema(Schema):
    bytes = fields.Integer(metadata={"description": "Size of the compressed model file."})
    sha256 = fields.String()
    format = fields.String(
        metadata={"description": "Format of the compressed model: the uploaded one (torchscript or pt2)."}
    )
    size_ratio = fields.Float(metadata={"description": "Compressed bytes / original bytes."})
    latency_ratio = fields.Float(allow_none=True, metadata={"description": "Compressed / original median latency."})
    cosine_similarity = fields.Float(allow_none=True)
    top1_agreement = fields.Float(allow_none=True)
    targets = fields.Dict(
        keys=fields.String(),
        values=fields.Dict(),
        metadata={
            "description": "Each export target the job reported: its status, and the bytes and SHA-256 of its artifact "
            "(GET /v1/jobs/<id>/artifacts lists them in full)."
        },
    )


class ArtifactSchema(Schema):
    name = fields.String(metadata={"description": "The export target: onnx, openvino or executorch."})
    status = fields.String(validate=validate.OneOf(("succeeded", "failed")))
    file = fields.String(allow_none=True, metadata={"description": "The artifact's file name (model.onnx, ...)."})
    format = fields.String(allow_none=True)
    bytes = fields.Integer(allow_none=True, metadata={"description": "Measured by the worker on the file published."})
    sha256 = fields.String(
        allow_none=True, metadata={"description": "Of the file published; the download's X-Checksum-Sha256 and ETag."}
    )
    runtime = fields.String(allow_none=True, metadata={"description": "What ran and timed it (the job's word)."})
    precision = fields.String(allow_none=True)
    latency_ms = fields.Float(allow_none=True)
    latency_ratio = fields.Float(allow_none=True, metadata={"description": "Its latency / the original model's."})
    reason = fields.String(allow_none=True, metadata={"description": "Why a failed target has no artifact."})
    href = fields.String(allow_none=True, metadata={"description": "The download, for a succeeded target."})


class ArtifactListSchema(Schema):
    artifacts = fields.List(
        fields.Nested(ArtifactSchema), metadata={"description": "One entry per target in spec.targets, in that order."}
    )


class ProblemSchema(Schema):
    type = fields.String()
    title = fields.String()
    status = fields.Integer()
    detail = fields.String()
    errors = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))


class LinksSchema(Schema):
    self = fields.String()
    model = fields.String()
    report = fields.String()
    artifacts = fields.String()


class RecordedSpec(fields.Nested):
    """The job's spec as recorded when it was accepted (``dump_spec``: already the JSON a client sent back
    with its defaults), shown as is: dumping it through ``CompressionSpec`` again would read attribute
    names where it holds JSON keys, and drop ``distill.student.from`` (attribute ``source``)."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return value


class JobSchema(Schema):
    id = fields.String()
    state = fields.String(validate=validate.OneOf(jobs.STATES))
    progress = fields.Float(metadata={"description": "0..1"})
    stage = fields.String(allow_none=True)
    created_at = fields.String()
    started_at = fields.String(allow_none=True)
    finished_at = fields.String(allow_none=True)
    cancel_requested = fields.Boolean()
    deliveries = fields.Integer(
        metadata={
            "description": "How many times a worker took the job (more than 1: it "
            "was taken over after its worker stopped)."
        }
    )
    spec = RecordedSpec(CompressionSpec)
    input = fields.Nested(FileInfoSchema)
    data = fields.Nested(FileInfoSchema, allow_none=True)
    student = fields.Nested(FileInfoSchema, allow_none=True)
    result = fields.Nested(ResultSchema, allow_none=True)
    error = fields.Nested(ProblemSchema, allow_none=True)
    warnings = fields.List(
        fields.String(),
        metadata={
            "description": "Set when the job succeeded with a result that may not be what was wanted: nothing was "
            "compressed, or the outputs collapsed (see docs/api.md for the thresholds)."
        },
    )
    callback_url = fields.String(allow_none=True)
    links = fields.Nested(LinksSchema)


class JobListSchema(Schema):
    jobs = fields.List(fields.Nested(JobSchema))
    next_cursor = fields.String(allow_none=True, metadata={"description": "Pass as ?cursor= for the next page."})


class JobListArgsSchema(Schema):
    state = fields.String(validate=validate.OneOf(jobs.STATES))
    limit = fields.Integer(load_default=20, validate=validate.Range(1, 100))
    cursor = fields.String(validate=validate.Regexp(r"^[0-9A-HJKMNP-TV-Z]{26}$", error="not a cursor from this API"))


class JobSubmissionSchema(Schema):
    """Documents the multipart body of POST /v1/jobs (the view parses it itself, to name each bad part)."""

    model = Upload(
        required=True,
        metadata={
            "description": "The model: TorchScript (torch.jit.save) or a torch.export program (torch.export.save, .pt2)."
        },
    )
    spec = fields.String(
        required=True, metadata={"description": "The compression spec as JSON text (a form field or a file part)."}
    )
    data = Upload(metadata={"description": "Optional .npz or .safetensors with an 'inputs' array (and 'labels')."})
    student = Upload(metadata={"description": "TorchScript student, when spec.distill.student.from is 'upload'."})
    callback_url = fields.String(
        metadata={"description": "http(s) URL that gets the job, signed, on each final state."}
    )


class HealthSchema(Schema):
    status = fields.String()
    redis = fields.String()
    workers = fields.Integer()
    sandbox = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        metadata={"description": "each worker's job sandbox: confined, or off (MODELPRESS_SANDBOX=off)"},
    )


class WebhookSecretSchema(Schema):
    secret = fields.String(metadata={"description": "whsec_<base64>; the HMAC key is the decoded part."})
    scheme = fields.String()
