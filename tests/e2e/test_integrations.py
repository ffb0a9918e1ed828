"""The CLI, the Python client, webhooks, idempotency, cheap polling, metrics and JSON logs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from modelpress.client import Client, ModelPressError
from tests.conftest import ApiClient
from tests.models import SmallConvNet, save_scripted
from tests.webhooks import WebhookReceiver

QUICK = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_scripted(SmallConvNet(), tmp_path_factory.mktemp("integrations") / "conv.pt")


def _cli(stack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODELPRESS_URL": stack.base_url}
    env.pop("MODELPRESS_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "modelpress.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


# ----------------------------------------------------------------------------- CLI and client


def test_cli_submit_wait_download_matches_the_reported_sha256(
    stack, api: ApiClient, model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "small.pt"
    done = _cli(
        stack, "submit", str(model), "--quantize", "dynamic", "--input-shape", "1,3,8,8", "--wait", "--out", str(out)
    )

    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout and "sha256 verified" in done.stdout
    # The model is conv-only: dynamic quantization has nothing to do, and the job says so.
    assert "warning: nothing was quantized: the model has no weight of the selected module types" in done.stdout
    assert "[" not in done.stderr  # no progress bars when stderr is not a terminal
    job_id = done.stdout.split()[1]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == api.job(job_id)["result"]["sha256"]

    status = _cli(stack, "status", job_id)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "succeeded"
    assert json.loads(status.stdout)["warnings"][0].startswith("nothing was quantized")
    listed = _cli(stack, "list", "--state", "succeeded", "--limit", "500")
    assert job_id in listed.stdout
    report = _cli(stack, "report", job_id)
    assert json.loads(report.stdout)["method"] == "quantize"
    again = _cli(stack, "download", job_id, "--out", str(tmp_path / "again.pt"))
    assert again.returncode == 0 and (tmp_path / "again.pt").read_bytes() == out.read_bytes()


def test_cli_failed_job_exits_non_zero_with_the_detail(stack, model: Path, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"method": "quantize", "input_shape": [1, 5, 8, 8]}))
    done = _cli(stack, "submit", str(model), "--spec", str(spec), "--wait")

    assert done.returncode == 1
    assert "failed: Invalid input" in done.stderr and "shape [1, 5, 8, 8]" in done.stderr


def test_cli_refused_request_exits_4_with_the_field(stack, model: Path) -> None:
    done = _cli(stack, "submit", str(model), "--prune", "1.5", "--input-shape", "1,3,8,8")
    assert done.returncode == 4
    assert "spec.prune.amount" in done.stderr


def test_cli_input_flags_become_the_spec_inputs(stack, model: Path) -> None:
    done = _cli(
        stack,
        "submit",
        str(model),
        "--quantize",
        "dynamic",
        "--input",
        "1,3,8,8",
        "--input",
        "1,16:int64:0:30000",
        "--input",
        "1,2:int8",
        "--output",
        "logits",
    )
    assert done.returncode == 4
    assert "spec.inputs.2.dtype" in done.stderr  # the third flag reached the service as inputs[2]
    assert "spec.inputs.1" not in done.stderr and "spec.output" not in done.stderr


def test_python_client_round_trip(stack, model: Path, tmp_path: Path) -> None:
    client = Client(stack.base_url)
    sent: list[tuple[int, int]] = []
    job = client.submit(model, QUICK, progress=lambda done, total: sent.append((done, total)))
    assert sent[-1][0] == sent[-1][1] > model.stat().st_size  # every byte of the body was reported
    seen: list[str] = []
    final = client.wait(job, timeout=120, on_update=lambda current: seen.append(current["state"]))
    assert final["state"] == "succeeded" and seen[-1] == "succeeded"
    path = client.download(final, tmp_path / "out.pt")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == final["result"]["sha256"]
    assert client.report(final)["size"]["bytes_after"] == path.stat().st_size
    assert client.cancel(final) is None
    with pytest.raises(ModelPressError) as refused:
        client.job(final["id"])
    assert refused.value.status == 404


# ----------------------------------------------------------------------------- polling and idempotency


def test_unchanged_job_answers_304_and_unfinished_jobs_carry_retry_after(api: ApiClient, model: Path) -> None:
    job = api.submit(model, QUICK).json()
    first = api.session.get(api.url(f"/v1/jobs/{job['id']}"))
    if first.json()["state"] not in ("succeeded", "failed", "cancelled"):
        assert first.headers["Retry-After"] == "2"
    final = api.wait(job["id"])
    response = api.session.get(api.url(f"/v1/jobs/{job['id']}"))
    assert "Retry-After" not in response.headers
    again = api.session.get(api.url(f"/v1/jobs/{job['id']}"), headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""
    assert final["state"] == "succeeded"


def test_idempotency_key_returns_the_first_job_and_refuses_a_different_request(api: ApiClient, model: Path) -> None:
    key = f"deploy-{time.time_ns()}"
    first = api.session.post(
        api.url("/v1/jobs"),
        headers={"Idempotency-Key": key},
        files={"model": ("m.pt", model.read_bytes())},
        data={"spec": json.dumps(QUICK)},
    )
    repeat = api.session.post(
        api.url("/v1/jobs"),
        headers={"Idempotency-Key": key},
        files={"model": ("other-name.pt", model.read_bytes())},
        data={"spec": json.dumps(QUICK)},
    )
    different = api.session.post(
        api.url("/v1/jobs"),
        headers={"Idempotency-Key": key},
        files={"model": ("m.pt", model.read_bytes())},
        data={"spec": json.dumps({**QUICK, "seed": 7})},
    )

    assert first.status_code == repeat.status_code == 202
    assert repeat.json()["id"] == first.json()["id"] and repeat.headers["Idempotent-Replayed"] == "true"
    assert different.status_code == 422 and "Idempotency-Key" in different.json()["errors"]
    document = api.session.get(api.url("/openapi.json")).json()
    assert any(p["name"] == "Idempotency-Key" for p in document["paths"]["/v1/jobs"]["post"]["parameters"])


# ----------------------------------------------------------------------------- webhooks


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(answer=lambda tries: 500 if not tries else 200) as running:
        yield running


def test_webhook_is_signed_and_retried_after_a_500(api: ApiClient, model: Path, receiver: WebhookReceiver) -> None:
    job = api.session.post(
        api.url("/v1/jobs"),
        files={"model": ("m.pt", model.read_bytes())},
        data={"spec": json.dumps(QUICK), "callback_url": receiver.url},
    ).json()
    assert job["callback_url"] == receiver.url
    assert api.wait(job["id"])["state"] == "succeeded"
    deadline = time.monotonic() + 60
    while len(receiver.tries) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)

    assert [one.status for one in receiver.tries] == [500, 200]
    secret = api.session.get(api.url("/v1/webhook-secret")).json()["secret"]
    for headers, body in ((one.headers, one.body) for one in receiver.tries):
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        expected = base64.b64encode(
            hmac.new(base64.b64decode(secret.removeprefix("whsec_")), signed, hashlib.sha256).digest()
        ).decode()
        assert headers["webhook-signature"] == f"v1,{expected}"
        payload = json.loads(body)
        assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job["id"]
    assert receiver.tries[0].webhook_id == receiver.tries[1].webhook_id


def test_private_callback_is_refused_unless_allowed(api: ApiClient, model: Path) -> None:
    from modelpress.webhooks import CallbackRefused, check_callback_url

    with pytest.raises(CallbackRefused, match="private, loopback or link-local"):
        check_callback_url("http://127.0.0.1:9/hook", allow_private=False)
    with pytest.raises(CallbackRefused, match="private, loopback or link-local"):
        check_callback_url("http://169.254.169.254/latest", allow_private=False)
    with pytest.raises(CallbackRefused, match="http"):
        check_callback_url("file:///etc/passwd", allow_private=True)
    response = api.session.post(
        api.url("/v1/jobs"),
        files={"model": ("m.pt", model.read_bytes())},
        data={"spec": json.dumps(QUICK), "callback_url": "gopher://x"},
    )
    assert response.status_code == 422 and "callback_url" in response.json()["errors"]


# ----------------------------------------------------------------------------- metrics and logs


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_until_idle(api: ApiClient, timeout: float = 300) -> None:
    """No queued or running job left by earlier tests (one finishing later would move the counters)."""
    deadline = time.monotonic() + timeout
    while any(
        api.session.get(api.url(f"/v1/jobs?state={state}&limit=100")).json()["jobs"] for state in ("queued", "running")
    ):
        assert time.monotonic() < deadline, "jobs of earlier tests are still queued or running"
        time.sleep(0.2)


def test_metrics_count_the_jobs_this_test_ran(stack, api: ApiClient, model: Path) -> None:
    _wait_until_idle(api)
    before = api.session.get(api.url("/metrics")).text
    ok = [api.submit(model, QUICK).json() for _ in range(3)]
    bad = api.submit(model, {**QUICK, "input_shape": [1, 9, 8, 8]}).json()
    for job in [*ok, bad]:
        api.wait(job["id"])
    # With two API processes, ask several times: every answer must be the same, complete count.
    answers = {api.session.get(api.url("/metrics")).text for _ in range(6)}
    assert len(answers) == 1
    after = answers.pop()

    def delta(series: str) -> float:
        return _sample(after, series) - _sample(before, series)

    assert delta('modelpress_jobs_submitted_total{method="quantize"}') == 4
    assert delta('modelpress_jobs_finished_total{state="succeeded",method="quantize"}') == 3
    assert delta('modelpress_jobs_finished_total{state="failed",method="quantize"}') == 1
    histogram = "modelpress_job_duration_seconds"  # observations are jobs: its count grows by one per job
    assert delta(histogram + '_count{method="quantize"}') == 4
    assert delta(histogram + '_bucket{method="quantize",le="+Inf"}') == 4
    assert delta("modelpress_uploaded_bytes_total") == 4 * model.stat().st_size
    assert "# TYPE modelpress_queue_depth gauge" in after


def test_one_json_log_line_per_transition(stack, api: ApiClient, model: Path) -> None:
    job = api.wait(api.submit(model, QUICK).json()["id"])
    assert job["state"] == "succeeded"
    deadline = time.monotonic() + 10
    while True:
        states = []
        for log_file in stack.log_dir.glob("*.log"):
            for line in log_file.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("job_id") == job["id"] and entry.get("event") == "transition":
                    states.append(entry["state"])
        if sorted(states) == ["queued", "running", "succeeded"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(states) == ["queued", "running", "succeeded"]
