"""The console in a real browser: submit through the form, watch a job live, read its charts, download,
cancel, see a 422 next to its field, and nothing loaded from outside the service."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import pytest
import torch
from playwright.sync_api import expect
from torch import nn

from tests.conftest import ApiClient
from tests.models import SlowModel, save_scripted
from tests.ui.conftest import CHROMIUM_ARGS, chromium_path

FAST = {"runs": "2", "warmup": "0"}


class TinyMLP(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.a = nn.Linear(16, width)
        self.b = nn.Linear(width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("console")
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", inputs=rng.standard_normal((64, 16)).astype(np.float32), labels=np.arange(64) % 4)
    (root / "garbage.pt").write_bytes(rng.bytes(4096))
    return {
        "mlp": save_scripted(TinyMLP(), root / "mlp.pt"),
        "data": root / "data.npz",
        "slow": save_scripted(SlowModel(steps=20000), root / "slow.pt"),
        "medium": save_scripted(SlowModel(steps=3000), root / "medium.pt"),
        "garbage": root / "garbage.pt",
    }


@pytest.fixture(scope="module")
def finished_job(api: ApiClient, files) -> dict:
    response = api.submit(
        files["mlp"], {"method": "quantize", "input_shape": [4, 16], "evaluation": {"runs": 2, "warmup": 0}}
    )
    assert response.status_code == 202, response.text
    job = api.wait(response.json()["id"], timeout=120)
    assert job["state"] == "succeeded", job["error"]
    return job


def fill_spec(page, **fields: str) -> None:
    for name, value in fields.items():
        page.fill(f"#f-spec-{name.replace('__', '-')}", value)


def test_submit_watch_charts_and_download(page, api: ApiClient, files, tmp_path: Path) -> None:
    page.goto("/ui/new")
    page.set_input_files("#f-model", str(files["mlp"]))
    fill_spec(
        page,
        input_shape="4, 16",
        evaluation__runs=FAST["runs"],
        evaluation__warmup=FAST["warmup"],
        quantize__exclude="head",
    )
    expect(page.locator("#f-spec-quantize-dtype")).to_have_value("qint8")  # defaults come from the schema
    page.click("#submit")
    page.wait_for_url(re.compile(r"/ui/jobs/[0-9A-Z]{26}$"))
    job_id = page.locator("#job-id").inner_text()
    first_state = page.locator("#job-status").get_attribute("data-state")
    assert first_state in ("queued", "running")  # the page opened before the job finished: what follows is live

    expect(page.locator("#job-status")).to_have_attribute("data-state", "succeeded", timeout=120_000)
    job = api.job(job_id)
    assert job["state"] == "succeeded"
    report = api.session.get(api.url(job["links"]["report"])).json()

    size = page.locator("svg[data-chart=size]")
    expect(size).to_have_count(1)
    assert float(size.locator("rect[data-series=before]").get_attribute("data-value")) == report["size"]["bytes_before"]
    assert float(size.locator("rect[data-series=after]").get_attribute("data-value")) == report["size"]["bytes_after"]
    assert size.locator("title").first.text_content().startswith("Model file size")
    latency = page.locator("svg[data-chart=latency]")
    assert (
        float(latency.locator("rect[data-series=after]").get_attribute("data-value")) == report["latency"]["after_ms"]
    )
    expect(latency.locator("text.axis-title")).to_have_text("ms")
    params = page.locator("svg[data-chart=parameters] rect[data-series=before]")
    assert float(params.get_attribute("data-value")) == report["parameters"]["before"]
    fidelity = page.locator("svg[data-chart=fidelity] rect[data-series='cosine similarity']")
    assert float(fidelity.get_attribute("data-value")) == pytest.approx(report["fidelity"]["cosine_similarity"])
    quantized = page.locator("table[data-table=quantized_modules] tbody tr")
    expect(quantized).to_have_count(2)
    kept = page.locator("table[data-table=kept_float] tbody tr")
    expect(kept).to_have_count(1)
    expect(kept).to_contain_text("head")
    expect(kept).to_contain_text("excluded by pattern 'head'")

    checksum = page.locator("#checksum").inner_text()
    assert checksum == job["result"]["sha256"]
    with page.expect_download() as download_info:
        page.click("#download")
    saved = tmp_path / "model.pt"
    download_info.value.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == checksum
    assert torch.jit.load(str(saved))(torch.randn(2, 16)).shape == (2, 4)

    # The README's picture: MODELPRESS_UI_SCREENSHOT_DIR=docs keeps it (the PNG in the repository came from here).
    shot = Path(os.environ.get("MODELPRESS_UI_SCREENSHOT_DIR") or tmp_path) / "console-job.png"
    page.set_viewport_size({"width": 900, "height": 1300})
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000

    page.goto("/ui/")
    row = page.locator(f"tr[data-job-id='{job_id}']")
    expect(row).to_have_attribute("data-state", "succeeded")
    page.select_option("#state-filter", "failed")
    page.click("form.filter button")
    expect(page).to_have_url(re.compile(r"state=failed"))
    expect(page.locator(f"tr[data-job-id='{job_id}']")).to_have_count(0)


def test_list_updates_live_newest_first(page, api: ApiClient, files, finished_job) -> None:
    response = api.submit(
        files["medium"], {"method": "quantize", "input_shape": [1, 64], "evaluation": {"runs": 30, "warmup": 0}}
    )
    new_id = response.json()["id"]
    page.goto("/")  # the service's root leads to the console
    expect(page).to_have_url(re.compile(r"/ui/$"))
    rows = page.locator("#job-rows tr[data-job-id]")
    ids = [rows.nth(i).get_attribute("data-job-id") for i in range(rows.count())]
    assert ids[0] == new_id and finished_job["id"] in ids
    assert ids == sorted(ids, reverse=True)  # ULIDs sort by creation: newest first
    row = page.locator(f"tr[data-job-id='{new_id}']")
    assert row.get_attribute("data-state") in ("queued", "running")  # unfinished when the page was drawn
    page.evaluate("window.sameDocument = true")
    expect(row).to_have_attribute("data-state", "succeeded", timeout=120_000)
    assert page.evaluate("window.sameDocument") is True  # updated in place: the rows poll, nothing reloaded


def test_422_is_shown_next_to_its_field(page, files) -> None:
    page.goto("/ui/new")
    page.set_input_files("#f-model", str(files["mlp"]))
    fill_spec(page, evaluation__runs="7")  # no input_shape and no data file: the service refuses the spec
    page.click("#submit")

    error = page.locator("[data-error-for='spec.input_shape']")
    expect(error).to_contain_text("when no data file is uploaded")
    field = page.locator("#f-spec-input_shape")
    expect(field).to_have_attribute("aria-invalid", "true")
    assert "f-spec-input_shape-error" in field.get_attribute("aria-describedby")
    assert page.locator(".field", has=field).locator("[data-error-for='spec.input_shape']").count() == 1
    expect(page.locator("#f-spec-evaluation-runs")).to_have_value("7")  # what was typed is kept
    expect(page.locator("#error-summary")).to_contain_text("spec.input_shape")
    expect(page.locator("#error-summary")).to_have_attribute("data-status", "422")

    # A file that is not TorchScript: the error sits next to the model field.
    page.set_input_files("#f-model", str(files["garbage"]))
    fill_spec(page, input_shape="4, 16")
    page.click("#submit")
    expect(page.locator("[data-error-for=model]")).to_be_visible()
    expect(page.locator("#f-model")).to_have_attribute("aria-invalid", "true")


def test_ranges_from_the_schema_are_enforced_by_the_form(page) -> None:
    page.goto("/ui/new")
    runs = page.locator("#f-spec-evaluation-runs")
    expect(runs).to_have_attribute("min", "1")
    expect(runs).to_have_attribute("max", "1000")
    runs.fill("5000")
    assert page.evaluate("document.querySelector('#f-spec-evaluation-runs').validity.rangeOverflow") is True
    page.select_option("#f-spec-method", "prune")
    expect(page.locator("fieldset[data-method=prune]")).to_be_visible()
    expect(page.locator("fieldset[data-method=quantize]")).to_be_hidden()
    amount = page.locator("#f-spec-prune-amount")
    expect(amount).to_have_value("0.5")
    amount.fill("1")  # 0 < amount < 1: an exclusive bound, checked by the page's script
    assert page.evaluate("document.querySelector('#f-spec-prune-amount').validity.customError") is True
    page.click("#submit")
    assert page.url.endswith("/ui/new")  # the browser refused to send it


def test_cancel_a_running_job(page, files) -> None:
    page.goto("/ui/new")
    page.set_input_files("#f-model", str(files["slow"]))
    fill_spec(page, input_shape="1, 64", evaluation__runs="1000", evaluation__warmup="0")
    page.uncheck("#f-spec-quantize-modules-1")  # no Linear: nothing to quantize, the timing is what runs long
    page.click("#submit")
    page.wait_for_url(re.compile(r"/ui/jobs/[0-9A-Z]{26}$"))
    status = page.locator("#job-status")
    expect(status).to_have_attribute("data-state", "running", timeout=120_000)
    expect(page.locator("#job-stage")).not_to_have_text("")
    page.click("#cancel")
    expect(status).to_have_attribute("data-state", "cancelled", timeout=60_000)
    expect(page.locator("#cancel")).to_have_count(0)


def test_distillation_curves_are_charted(page, api: ApiClient, files) -> None:
    page.goto("/ui/new")
    page.set_input_files("#f-model", str(files["mlp"]))
    page.set_input_files("#f-data", str(files["data"]))
    page.select_option("#f-spec-method", "distill")
    fill_spec(
        page,
        distill__epochs="3",
        distill__batch_size="16",
        distill__student__width="0.5",
        evaluation__runs="1",
        evaluation__warmup="0",
    )
    page.select_option("#f-spec-distill-student-from", "width")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/ui/jobs/[0-9A-Z]{26}$"))
    expect(page.locator("#job-status")).to_have_attribute("data-state", "succeeded", timeout=120_000)
    job_id = page.locator("#job-id").inner_text()
    report = api.session.get(api.url(f"/v1/jobs/{job_id}/report")).json()
    epochs = report["details"]["epochs"]

    loss = page.locator("svg[data-chart='curve-epochs-loss']")
    expect(loss.locator("g.series[data-series='train loss'] g.point")).to_have_count(3)
    points = loss.locator("g.series[data-series='train loss'] g.point")
    assert [float(points.nth(i).get_attribute("data-y")) for i in range(3)] == [e["train_loss"] for e in epochs]
    expect(loss.locator("text.axis-title").first).to_have_text("epoch")
    scores = page.locator("svg[data-chart='curve-epochs-scores'] g.series")
    assert {scores.nth(i).get_attribute("data-series") for i in range(scores.count())} == {"agreement", "accuracy"}
    expect(page.locator("table[data-table=groups] tbody tr").first).to_be_visible()  # the width student's groups


def test_pages_work_at_phone_width_and_by_keyboard(browser, stack, recorder, finished_job) -> None:
    from tests.ui.conftest import open_page

    context, page = open_page(
        browser, stack.base_url, recorder, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True
    )
    try:
        for path in ("/ui/", "/ui/new", f"/ui/jobs/{finished_job['id']}"):
            page.goto(path)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 376, f"{path} scrolls sideways at phone width ({width} px)"
            unlabelled = page.evaluate("""[...document.querySelectorAll('input:not([type=hidden]), select, textarea, button')]
                .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
                .map(el => el.outerHTML)""")
            assert unlabelled == [], f"{path}: controls without a label"
        page.goto("/ui/new")
        page.keyboard.press("Tab")
        reached = []
        for _ in range(80):
            page.keyboard.press("Tab")
            reached.append(page.evaluate("document.activeElement.id"))
            if reached[-1] == "submit":
                break
        assert "f-model" in reached and "f-spec-method" in reached and reached[-1] == "submit"
    finally:
        context.close()
    assert recorder.outside(stack.base_url) == [] and recorder.errors == []


def test_docs_load_everything_from_the_service(page, stack, recorder) -> None:
    page.goto("/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("ModelPress", timeout=30_000)
    assert stack.base_url + "/docs/assets/swagger-ui-bundle.js" in recorder.requests
    assert recorder.outside(stack.base_url) == []


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def dump_dom(url: str, *extra: str) -> str:
    """Exactly the acceptance check: ``chromium --headless --dump-dom URL`` (plus root's --no-sandbox)."""
    result = subprocess.run(
        [chromium_path(), *CHROMIUM_ARGS, *extra, "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def outside_links(html: str, base_url: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    origin = urlsplit(base_url).netloc
    return [
        url
        for url in parser.urls
        if not url.startswith("data:") and urlsplit(urljoin(base_url + "/", url)).netloc != origin
    ]


def test_dump_dom_acceptance(stack, finished_job) -> None:
    job_id = finished_job["id"]
    listing = dump_dom(stack.base_url + "/ui/")
    assert f'data-job-id="{job_id}"' in listing and job_id in listing
    assert outside_links(listing, stack.base_url) == []

    job_page = dump_dom(f"{stack.base_url}/ui/jobs/{job_id}")
    assert 'id="job-status" data-state="succeeded"' in job_page
    assert job_page.count("<svg") >= 1 and 'data-chart="size"' in job_page
    assert outside_links(job_page, stack.base_url) == []

    docs = dump_dom(stack.base_url + "/docs", "--virtual-time-budget=3000")  # time for Swagger UI to draw
    assert "/docs/assets/swagger-ui-bundle.js" in docs
    assert "swagger-ui" in docs and "ModelPress" in docs  # rendered by the local script
    assert outside_links(docs, stack.base_url) == []
