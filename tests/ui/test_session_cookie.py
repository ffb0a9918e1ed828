"""The console's session cookie: HttpOnly and SameSite=Strict always, Secure whenever the request came over https."""

from __future__ import annotations

from pathlib import Path

from modelpress.config import Settings
from modelpress.keys import hash_key
from service import create_app


def _cookie_of(app, base_url: str) -> str:
    response = app.test_client().get("/ui/sign-in", base_url=base_url)
    assert response.status_code == 200
    cookies = [value for name, value in response.headers.items() if name == "Set-Cookie"]
    assert len(cookies) == 1 and cookies[0].startswith("modelpress_console=")
    return cookies[0]


def test_session_cookie_flags(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text(f"alpha sha256:{hash_key('mp_key')}\n")
    # Redis is never reached: showing the sign-in form only makes the session (its CSRF token).
    app = create_app(
        Settings(redis_url="redis://127.0.0.1:9/0", data_dir=tmp_path / "data", api_keys_file=tmp_path / "keys")
    )
    plain = _cookie_of(app, "http://console.test")
    assert "HttpOnly" in plain and "SameSite=Strict" in plain and "Secure" not in plain
    secure = _cookie_of(app, "https://console.test")
    assert "HttpOnly" in secure and "SameSite=Strict" in secure and "Secure" in secure
    assert (tmp_path / "data" / "console-secret.key").read_text().strip() == app.secret_key  # made once, kept
    assert (
        create_app(
            Settings(redis_url="redis://127.0.0.1:9/0", data_dir=tmp_path / "data", api_keys_file=tmp_path / "keys")
        ).secret_key
        == app.secret_key
    )
    assert (
        create_app(
            Settings(
                redis_url="redis://127.0.0.1:9/0",
                data_dir=tmp_path / "data",
                secret_key="s3",
                api_keys_file=tmp_path / "keys",
            )
        ).secret_key
        == "s3"
    )
