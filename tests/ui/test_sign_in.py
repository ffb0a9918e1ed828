"""Keys on: sign in with a key, see only your tenant's jobs, CSRF on every form, sign out for good."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect

from modelpress.stack import Stack
from tests.conftest import ApiClient, make_settings, write_keys
from tests.models import SmallConvNet, save_scripted
from tests.ui.conftest import open_page

KEYS = {"alpha": "mp_alpha-console-key", "beta": "mp_beta-console-key"}
SPEC = {"method": "quantize", "input_shape": [1, 3, 8, 8]}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis and the API with keys on; no worker, so submitted jobs stay queued (nothing here needs them run)."""
    root = tmp_path_factory.mktemp("console-keys")
    write_keys(root / "keys", KEYS)
    stack = Stack(
        make_settings(root / "data", redis_url=None, api_keys_file=root / "keys", api_workers=1, max_active_jobs=40),
        log_dir=root / "logs",
    )
    try:
        stack.start(worker=False)
        yield stack
    finally:
        stack.stop()


def submit_as(stack: Stack, tenant: str, model: Path) -> str:
    client = ApiClient(stack.base_url)
    client.session.headers["Authorization"] = f"Bearer {KEYS[tenant]}"
    response = client.submit(model, SPEC)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_sign_in_tenants_csrf_and_sign_out(browser, keyed: Stack, recorder, tmp_path: Path) -> None:
    model = save_scripted(SmallConvNet(), tmp_path / "conv.pt")
    alpha_job, beta_job = submit_as(keyed, "alpha", model), submit_as(keyed, "beta", model)
    context, page = open_page(browser, keyed.base_url, recorder)
    try:
        page.goto("/ui/")
        expect(page).to_have_url(re.compile(r"/ui/sign-in\?next=/ui/$"))
        assert page.request.get("/v1/jobs").status == 401  # no session, no key: nothing to read

        page.goto("/ui/sign-in?next=//evil.example/phish")  # an open redirect would take the tenant away
        page.fill("#key", "mp_not-a-key")
        page.click("button[type=submit]")
        expect(page.locator("#sign-in-error")).to_have_text("That key is not valid.")
        expect(page.locator("#key")).to_have_attribute("aria-invalid", "true")

        page.fill("#key", KEYS["alpha"])
        page.click("main button[type=submit]")
        expect(page).to_have_url(keyed.base_url + "/ui/")
        expect(page.locator("[data-tenant]")).to_have_text("alpha")
        expect(page.locator(f"tr[data-job-id='{alpha_job}']")).to_have_count(1)
        expect(page.locator(f"tr[data-job-id='{beta_job}']")).to_have_count(0)
        cookie = next(c for c in context.cookies() if c["name"] == "modelpress_console")
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["secure"] is False
        assert KEYS["alpha"] not in cookie["value"]

        # Exactly the API's view of the tenant: another tenant's job is missing, through the page and the API.
        assert page.request.get(f"/ui/jobs/{beta_job}").status == 404
        assert page.request.get(f"/v1/jobs/{beta_job}").status == 404
        assert [j["id"] for j in page.request.get("/v1/jobs").json()["jobs"]] == [alpha_job]
        # The session only reads the API; writes need the key (or the console's forms with their token).
        assert page.request.delete(f"/v1/jobs/{alpha_job}").status == 401
        forged = page.request.post(f"/ui/jobs/{alpha_job}/cancel", form={"csrf_token": "forged"})
        assert forged.status == 400
        assert page.request.post(f"/ui/jobs/{alpha_job}/cancel", form={}).status == 400
        assert page.request.get(f"/v1/jobs/{alpha_job}").json()["state"] == "queued"

        page.goto(f"/ui/jobs/{alpha_job}")
        page.click("#cancel")
        expect(page.locator("#job-status")).to_have_attribute("data-state", "cancelled")

        stolen = cookie["value"]
        page.click("header button[type=submit]")  # sign out
        expect(page).to_have_url(re.compile(r"/ui/sign-in$"))
        page.goto("/ui/")
        expect(page).to_have_url(re.compile(r"/ui/sign-in"))
        assert page.request.get("/v1/jobs").status == 401
    finally:
        context.close()

    # A copy of the signed-out cookie signs nobody in.
    replay, replay_page = open_page(browser, keyed.base_url, recorder)
    try:
        replay.add_cookies([{"name": "modelpress_console", "value": stolen, "url": keyed.base_url}])
        assert replay_page.request.get("/v1/jobs").status == 401
        replay_page.goto("/ui/")
        expect(replay_page).to_have_url(re.compile(r"/ui/sign-in"))
    finally:
        replay.close()
    assert recorder.outside(keyed.base_url) == [] and recorder.errors == []


def test_the_list_pages_newest_first(browser, keyed: Stack, recorder, tmp_path: Path) -> None:
    model = save_scripted(SmallConvNet(), tmp_path / "conv.pt")
    submitted = [submit_as(keyed, "beta", model) for _ in range(23)]
    context, page = open_page(browser, keyed.base_url, recorder)
    try:
        page.goto("/ui/")
        page.fill("#key", KEYS["beta"])
        page.click("main button[type=submit]")
        rows = page.locator("#job-rows tr[data-job-id]")
        expect(rows).to_have_count(20)
        first = [rows.nth(i).get_attribute("data-job-id") for i in range(20)]
        page.click("a[rel=next]")
        expect(page).to_have_url(re.compile(r"cursor="))
        rest = [rows.nth(i).get_attribute("data-job-id") for i in range(rows.count())]
        listed = first + rest
        assert listed == sorted(listed, reverse=True) and set(submitted) <= set(listed)
        assert len(listed) == len(set(listed))  # no job on two pages
        expect(page.locator("a[rel=next]")).to_have_count(0)
    finally:
        context.close()
    assert recorder.outside(keyed.base_url) == [] and recorder.errors == []
