"""Export-target artifacts (issue 25), from the job's child to the client: checked, published, served.

A real ``Supervisor`` runs here on a real Redis and the real API (gunicorn) serves what it published,
from the data directory and from a real S3 server (SeaweedFS). The job's child is a scripted program
(the supervisor's ``child_command``, as in ``test_untrusted_child.py``) that writes ``output/model.pt``,
artifacts and a report, honest or forged: the engine's exports are not needed to test what the
service does with what a child leaves.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from modelpress.artifacts import NotPlainFile
from modelpress.cli import main as cli
from modelpress.client import Client, ModelPressError
from modelpress.jobs import JobStore, connect, new_job_id, utc_now
from modelpress.objectstore import LocalObjects, open_object_store
from modelpress.seaweed import SeaweedServer
from modelpress.spec import dump_spec, parse_spec
from modelpress.stack import Stack
from modelpress.storage import JobFiles, Storage
from tests.conftest import make_settings
from tests.models import SmallConvNet, save_scripted
from workers import job_protocol as protocol
from workers.job_protocol import InvalidReport
from workers.supervisor import Supervisor
from workers.target_report import check_targets

QUICK = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}
ONNX_BYTES = b"not really onnx, but bytes to serve " * 300
BUCKET = "modelpress-artifacts"

CHILD = """
import json, os, shutil, sys
job = sys.argv[1]
pipe = os.fdopen(int(os.environ["MODELPRESS_PROGRESS_FD"]), "wb", buffering=0)
def send(**message):
    pipe.write(json.dumps(message).encode() + b"\\n")
def report(targets, **changes):
    shutil.copy(job + "/input/model.pt", job + "/output/model.pt")
    figures = {"format": {"input": "torchscript", "output": "torchscript"}, "size": {"ratio": 1.0},
               "latency": {"ratio": 0.8, "before_ms": 3.125, "after_ms": 2.5, "runtime": "torchscript"}, "fidelity": {"cosine_similarity": 0.999, "top1_agreement": 1.0},
               "warnings": ["target openvino failed: no IR for you"], "targets": targets}
    figures.update(changes)
    with open(job + "/output/report.json", "w") as handle:
        json.dump(figures, handle)
def write(name, data):
    with open(job + "/output/" + name, "wb") as handle:
        handle.write(data)
send(event="started")
"""
ONNX_DATA = f"ONNX = {ONNX_BYTES!r}\n"
HONEST = """
write("model.onnx", ONNX)
report({"onnx": {"status": "succeeded", "file": "model.onnx", "format": "onnx", "runtime": "onnxruntime 1.31.1",
                 "precision": "int8", "bytes": 1, "sha256": "0" * 64, "latency_ms": 1.25, "latency_ratio": 0.4,
                 "fidelity": {"cosine_similarity": 0.998, "top1_agreement": 1.0}, "notes": ["int8 weights"],
                 "smuggled": "x" * 100},
        "openvino": {"status": "failed", "reason": "no IR for you"}})
send(event="succeeded")
"""


class Harness:
    """Redis and the API (no worker); jobs recorded as the API records them, run by a Supervisor here."""

    def __init__(self, root: Path, **settings: Any) -> None:
        self.stack = Stack(
            make_settings(root / "data", redis_url=None, job_threads=1, job_timeout_s=120, **settings),
            log_dir=root / "logs",
        )
        self.stack.start(worker=False)
        self.settings = self.stack.settings
        self.store = JobStore(connect(self.settings.redis_url))
        self.storage = Storage(self.settings.data_dir)
        self.objects = open_object_store(self.settings, self.storage)
        self.model = save_scripted(SmallConvNet(), root / "quick.pt")
        self.url = self.stack.base_url

    def submit(self, targets: list[str], required: bool = False) -> JobFiles:
        job_id = new_job_id()
        files = self.storage.job(job_id)
        files.input_model.parent.mkdir(parents=True)
        shutil.copy(self.model, files.input_model)
        spec = dump_spec(parse_spec({**QUICK, "targets": targets, "targets_required": required}))
        files.spec.write_text(json.dumps(spec))
        body = files.input_model.read_bytes()
        self.objects.keep_inputs(job_id)
        self.store.create(
            {
                "id": job_id,
                "tenant": "public",
                "state": "queued",
                "progress": 0.0,
                "stage": "queued",
                "created_at": utc_now(),
                "started_at": None,
                "finished_at": None,
                "spec": spec,
                "input": {
                    "bytes": len(body),
                    "sha256": hashlib.sha256(body).hexdigest(),
                    "format": "torchscript",
                    "filename": "quick.pt",
                },
                "data": None,
                "student": None,
                "result": None,
                "error": None,
                "warnings": [],
                "callback_url": None,
            }
        )
        return files

    def run(self, program: str, targets: list[str], required: bool = False) -> tuple[dict[str, Any], JobFiles]:
        files = self.submit(targets, required)
        command = (sys.executable, "-c", CHILD + ONNX_DATA + textwrap.dedent(program))
        Supervisor(self.settings, self.store, self.storage, self.objects, child_command=command).run(files.root.name)
        return self.store.get(files.root.name), files

    def get(self, path: str, **headers: str) -> requests.Response:
        return requests.get(self.url + path, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    harness = Harness(tmp_path_factory.mktemp("artifacts-local"))
    try:
        yield harness
    finally:
        harness.stack.stop()


@pytest.fixture(scope="module")
def honest(local: Harness) -> dict[str, Any]:
    job, _ = local.run(HONEST, ["onnx", "openvino"])
    assert job["state"] == "succeeded", job["error"]
    return job


def published_artifacts(harness: Harness, job_id: str) -> list[str]:
    return sorted(path.name for path in harness.storage.job(job_id).root.glob("artifact.*"))


# ----------------------------------------------------------------------------- a well-formed artifact


def test_artifact_is_published_with_its_measured_size_and_digest(local: Harness, honest: dict[str, Any]) -> None:
    digest = hashlib.sha256(ONNX_BYTES).hexdigest()
    assert honest["result"]["targets"] == {
        "onnx": {"status": "succeeded", "bytes": len(ONNX_BYTES), "sha256": digest},
        "openvino": {"status": "failed"},
    }  # the child claimed 1 byte and zeros
    assert honest["warnings"] == ["target openvino failed: no IR for you"]
    assert published_artifacts(local, honest["id"]) == [f"artifact.attempt-{honest['attempt']}.model.onnx"]
    report = local.get(f"/v1/jobs/{honest['id']}/report").json()
    assert "smuggled" not in report["targets"]["onnx"]  # fields not in the schema are dropped
    assert report["targets"]["onnx"]["sha256"] == digest


def test_artifacts_are_listed_with_a_link_or_a_reason(local: Harness, honest: dict[str, Any]) -> None:
    job = local.get(f"/v1/jobs/{honest['id']}").json()
    assert job["links"]["artifacts"] == f"/v1/jobs/{honest['id']}/artifacts"
    listed = local.get(job["links"]["artifacts"])
    assert listed.status_code == 200, listed.text
    onnx, openvino = listed.json()["artifacts"]
    assert onnx == {
        "name": "onnx",
        "status": "succeeded",
        "file": "model.onnx",
        "format": "onnx",
        "bytes": len(ONNX_BYTES),
        "sha256": hashlib.sha256(ONNX_BYTES).hexdigest(),
        "runtime": "onnxruntime 1.31.1",
        "precision": "int8",
        "latency_ms": 1.25,
        "latency_ratio": 0.4,
        "reason": None,
        "href": f"/v1/jobs/{honest['id']}/artifacts/onnx",
    }
    assert openvino["status"] == "failed" and openvino["reason"] == "no IR for you" and openvino["href"] is None


def test_artifact_downloads_byte_identical_with_the_models_headers(local: Harness, honest: dict[str, Any]) -> None:
    response = local.get(f"/v1/jobs/{honest['id']}/artifacts/onnx", **{"Accept-Encoding": "identity"})
    assert response.status_code == 200
    digest = hashlib.sha256(ONNX_BYTES).hexdigest()
    assert response.content == ONNX_BYTES
    assert response.headers["X-Checksum-Sha256"] == digest and response.headers["ETag"] == f'"{digest}"'
    assert response.headers["Content-Disposition"] == "attachment; filename=quick.quantize.onnx"
    ranged = local.get(
        f"/v1/jobs/{honest['id']}/artifacts/onnx", Range="bytes=10-19", **{"Accept-Encoding": "identity"}
    )
    assert ranged.status_code == 206 and ranged.content == ONNX_BYTES[10:20]
    unchanged = local.get(
        f"/v1/jobs/{honest['id']}/artifacts/onnx", **{"If-None-Match": f'"{digest}"', "Accept-Encoding": "identity"}
    )
    assert unchanged.status_code == 304
    model = local.get(f"/v1/jobs/{honest['id']}/model")  # the model is served as before
    assert model.status_code == 200 and model.content == local.model.read_bytes()


def test_failed_and_unasked_targets_are_404_naming_the_target(local: Harness, honest: dict[str, Any]) -> None:
    failed = local.get(f"/v1/jobs/{honest['id']}/artifacts/openvino")
    assert failed.status_code == 404 and failed.headers["Content-Type"] == "application/problem+json"
    assert "'openvino' failed" in failed.json()["detail"] and "no IR for you" in failed.json()["detail"]
    unasked = local.get(f"/v1/jobs/{honest['id']}/artifacts/executorch")
    assert unasked.status_code == 404 and "did not ask for target 'executorch'" in unasked.json()["detail"]
    for name in ("..%2F..%2Freport", "model.pt", "report"):
        assert local.get(f"/v1/jobs/{honest['id']}/artifacts/{name}").status_code == 404
    assert local.get(f"/v1/jobs/{new_job_id()}/artifacts").status_code == 404


def test_artifacts_of_an_unfinished_job_are_409(local: Harness) -> None:
    files = local.submit(["onnx"])  # recorded, never run
    for path in ("artifacts", "artifacts/onnx"):
        response = local.get(f"/v1/jobs/{files.root.name}/{path}")
        assert response.status_code == 409 and response.json()["type"].endswith("/job-not-succeeded")


def test_console_job_page_shows_the_artifacts(local: Harness, honest: dict[str, Any]) -> None:
    page = local.get(f"/ui/jobs/{honest['id']}")
    assert page.status_code == 200
    table = page.text[page.text.index('data-table="artifacts"') :]
    onnx = table[table.index('data-target="onnx"') : table.index('data-target="openvino"')]
    assert "onnxruntime 1.31.1" in onnx and "int8" in onnx and "0.4" in onnx
    assert f'href="/v1/jobs/{honest["id"]}/artifacts/onnx"' in onnx
    assert "failed: no IR for you" in table[table.index('data-target="openvino"') :]
    # The runtimes side by side: the original and the result on torch, then the ONNX artifact on its runtime.
    section = page.text[page.text.index('id="artifacts-h"') : page.text.index('data-table="artifacts"')]
    assert bars(section, "runtime-latency") == [
        ("original (torchscript)", 3.125),
        ("result (torchscript)", 2.5),
        ("onnx (onnxruntime)", 1.25),
    ]
    assert bars(section, "runtime-cosine") == [("result", 0.999), ("onnx", 0.998)]


def bars(page: str, chart: str) -> list[tuple[str, float]]:
    """The (series, value) of each bar of the chart named ``chart`` in ``page``."""
    drawn = page[page.index(f'data-chart="{chart}"') :]
    drawn = drawn[: drawn.index("</svg>")]
    return [
        (html.unescape(name), float(value))
        for name, value in re.findall(r'class="bar" data-series="([^"]*)" data-value="([^"]*)"', drawn)
    ]


def test_client_and_cli_round_trip(
    local: Harness, honest: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = Client(local.url)
    assert [entry["name"] for entry in client.artifacts(honest["id"])] == ["onnx", "openvino"]
    assert client.download(honest["id"], tmp_path / "a.onnx", target="onnx").read_bytes() == ONNX_BYTES
    with pytest.raises(ModelPressError) as refused:
        client.download(honest["id"], tmp_path / "b.xml", target="openvino")
    assert refused.value.status == 404
    assert (
        cli(["--url", local.url, "download", honest["id"], "--target", "onnx", "--out", str(tmp_path / "c.onnx")]) == 0
    )
    assert (tmp_path / "c.onnx").read_bytes() == ONNX_BYTES
    assert "sha256 verified" in capsys.readouterr().out


def test_cli_submit_adds_targets_to_the_spec(
    local: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**QUICK, "targets": ["openvino"]}))
    assert (
        cli(
            [
                "--url",
                local.url,
                "submit",
                str(local.model),
                "--spec",
                str(spec),
                "--target",
                "onnx",
                "--target",
                "openvino",
            ]
        )
        == 0
    )
    job = json.loads(capsys.readouterr().out)
    assert job["spec"]["targets"] == ["openvino", "onnx"]
    local.store.delete(job["id"])  # no worker here: it would wait forever


def test_deleting_the_job_removes_its_artifacts(local: Harness) -> None:
    job, files = local.run(HONEST, ["onnx", "openvino"])
    assert published_artifacts(local, job["id"])  # the positive control: they were there
    assert requests.delete(f"{local.url}/v1/jobs/{job['id']}", timeout=30).status_code == 204
    assert not files.root.exists()
    assert local.get(f"/v1/jobs/{job['id']}/artifacts/onnx").status_code == 404


# ----------------------------------------------------------------------------- forged reports

FORGED = {
    "a name outside output/": (
        """
        write("model.onnx", ONNX)
        report({"onnx": {"status": "succeeded", "file": "../../x"}})
        send(event="succeeded")""",
        ["onnx"],
        False,
        "'targets.onnx.file' is not 'model.onnx'",
    ),
    "the model's name": (
        """
        report({"onnx": {"status": "succeeded", "file": "model.pt"}})
        send(event="succeeded")""",
        ["onnx"],
        False,
        "'targets.onnx.file' is not 'model.onnx'",
    ),
    "a target the spec did not ask for": (
        """
        write("model.onnx", ONNX)
        write("model.pte", ONNX)
        report({"onnx": {"status": "succeeded", "file": "model.onnx"},
                "executorch": {"status": "succeeded", "file": "model.pte"}})
        send(event="succeeded")""",
        ["onnx"],
        False,
        "'targets.executorch': the spec did not ask for it",
    ),
    "a file it never wrote": (
        """
        report({"onnx": {"status": "succeeded", "file": "model.onnx"}})
        send(event="succeeded")""",
        ["onnx"],
        False,
        "'targets.onnx.file': output/model.onnx does not exist",
    ),
    "an unknown status": (
        """
        report({"onnx": {"status": "maybe"}})
        send(event="succeeded")""",
        ["onnx"],
        False,
        "'targets.onnx.status'",
    ),
    "a figure that is not one": (
        """
        write("model.onnx", ONNX)
        report({"onnx": {"status": "succeeded", "file": "model.onnx", "latency_ms": float("nan")}})
        send(event="succeeded")""",
        ["onnx"],
        False,
        "not JSON",
    ),
    "a runtime of control characters": (
        """
        write("model.onnx", ONNX)
        report({"onnx": {"status": "succeeded", "file": "model.onnx", "runtime": "ort\\r\\nX-Evil: 1"}})
        send(event="succeeded")""",
        ["onnx"],
        False,
        "'targets.onnx.runtime'",
    ),
    "a required target that failed": (
        """
        report({"onnx": {"status": "failed", "reason": "no"}})
        send(event="succeeded")""",
        ["onnx"],
        True,
        "'targets.onnx' did not succeed, and the spec's targets_required",
    ),
}


@pytest.mark.parametrize("forgery", list(FORGED))
def test_forged_target_report_fails_the_job_and_publishes_nothing(local: Harness, forgery: str) -> None:
    program, targets, required, wrong = FORGED[forgery]
    job, files = local.run(program, targets, required)
    assert job["state"] == "failed", job["result"]
    assert job["error"]["type"].endswith("/invalid-report") and wrong in job["error"]["detail"], job["error"]
    assert published_artifacts(local, job["id"]) == []
    assert not (files.root / "x").exists() and not (files.root.parent.parent / "x").exists()


def test_a_failed_optional_target_or_one_left_out_still_succeeds(local: Harness) -> None:
    job, _ = local.run(
        """
        report({"onnx": {"status": "failed", "reason": "exporter crashed"}})
        send(event="succeeded")""",
        ["onnx", "executorch"],
    )
    assert job["state"] == "succeeded", job["error"]
    listed = {entry["name"]: entry for entry in local.get(f"/v1/jobs/{job['id']}/artifacts").json()["artifacts"]}
    assert listed["onnx"]["reason"] == "exporter crashed"
    assert "does not mention it" in listed["executorch"]["reason"]


def test_a_symlink_artifact_to_a_host_file_is_refused_and_never_served(local: Harness, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"host secret")
    job, _files = local.run(
        f"""
        os.symlink({str(secret)!r}, job + "/output/model.onnx")
        report({{"onnx": {{"status": "succeeded", "file": "model.onnx"}}}})
        send(event="succeeded")""",
        ["onnx"],
    )
    assert job["state"] == "failed"
    assert job["error"]["type"].endswith("/invalid-output") and "output/model.onnx" in job["error"]["detail"]
    assert published_artifacts(local, job["id"]) == []
    assert local.get(f"/v1/jobs/{job['id']}/artifacts/onnx").status_code == 409
    assert secret.read_bytes() == b"host secret"


def test_a_link_or_fifo_named_as_an_artifact_is_never_published(local: Harness, tmp_path: Path) -> None:
    """Behind the sandbox's own check (above): what the report check and the publisher do with a
    file swapped after the job ended."""
    files = JobFiles(tmp_path / "job")
    files.output_model.parent.mkdir(parents=True)
    (tmp_path / "host").write_bytes(b"host")
    report = {"targets": {"onnx": {"status": "succeeded", "file": "model.onnx"}}}
    files.output_artifact("model.onnx").write_bytes(b"plain")  # the positive control
    assert check_targets(json.loads(json.dumps(report)), ("onnx",), False, files) == ["onnx"]
    objects = LocalObjects(Storage(tmp_path))
    assert objects.publish_artifact("job", 1, files, "model.onnx")[0] == 5
    for make in (lambda path: path.symlink_to(tmp_path / "host"), lambda path: os.mkfifo(path)):
        files.output_artifact("model.onnx").unlink()
        files.published_artifact(1, "model.onnx").unlink(missing_ok=True)
        make(files.output_artifact("model.onnx"))
        with pytest.raises(InvalidReport, match="not a plain file"):
            check_targets(json.loads(json.dumps(report)), ("onnx",), False, files)
        with pytest.raises(NotPlainFile):
            objects.publish_artifact("job", 1, files, "model.onnx")
        assert not files.published_artifact(1, "model.onnx").exists()
    with pytest.raises(ValueError):
        files.published_artifact(1, "../model.pt")


def test_output_bound_grows_with_the_targets_asked_for(tmp_path: Path) -> None:
    files = JobFiles(tmp_path)
    files.input_model.parent.mkdir(parents=True)
    files.input_model.write_bytes(b"x" * 1000)
    files.spec.write_text(json.dumps({"method": "quantize"}))
    alone = protocol.output_limit_bytes(files)
    files.spec.write_text(json.dumps({"method": "quantize", "targets": ["onnx", "openvino"]}))
    assert protocol.output_limit_bytes(files) - alone == 2 * protocol.OUTPUT_INPUT_FACTOR * 1000


# ----------------------------------------------------------------------------- an S3 store


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    root = tmp_path_factory.mktemp("artifacts-s3")
    server = SeaweedServer(root / "s3", log_path=root / "logs" / "weed.log").start()
    variables = server.environment()
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)  # boto3's own variables, for the API's processes and this one
    harness = None
    try:
        server.create_bucket(BUCKET)
        harness = Harness(root, storage_url=f"s3://{BUCKET}/e2e")
        harness.bucket = server.client()
        yield harness
    finally:
        if harness is not None:
            harness.stack.stop()
        server.stop(bound=3)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_s3_artifact_is_published_served_and_deleted(s3: Harness) -> None:
    job, _ = s3.run(HONEST, ["onnx", "openvino"])
    assert job["state"] == "succeeded", job["error"]

    def keys() -> list[str]:
        listing = s3.bucket.list_objects_v2(Bucket=BUCKET, Prefix=f"e2e/jobs/{job['id']}/")
        return sorted(item["Key"].rsplit("/", 1)[1] for item in listing.get("Contents", []))

    attempt = job["attempt"]
    assert f"artifact.attempt-{attempt}.model.onnx" in keys()
    assert [entry["status"] for entry in s3.get(f"/v1/jobs/{job['id']}/artifacts").json()["artifacts"]] == [
        "succeeded",
        "failed",
    ]
    response = s3.get(f"/v1/jobs/{job['id']}/artifacts/onnx", **{"Accept-Encoding": "identity"})
    assert response.status_code == 200 and response.content == ONNX_BYTES
    assert response.headers["X-Checksum-Sha256"] == hashlib.sha256(ONNX_BYTES).hexdigest()
    assert "quick.quantize.onnx" in response.headers["Content-Disposition"]
    assert requests.delete(f"{s3.url}/v1/jobs/{job['id']}", timeout=30).status_code == 204
    assert keys() == []
