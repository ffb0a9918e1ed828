"""Bearer API keys and tenants for every /v1 route."""

from __future__ import annotations

import hmac
import logging
import secrets

from flask import Flask, current_app, g, request, session

from modelpress.config import Settings
from modelpress.keys import hash_key, load_keys, tenant_for
from service.problems import ApiProblem

log = logging.getLogger("modelpress.api")
OPEN_TENANT = "public"


def auth_init_app(app: Flask, settings: Settings) -> None:
    hashes = load_keys(settings.api_keys_file) if settings.api_keys_file else None
    app.extensions["modelpress_keys"] = hashes
    if hashes is None:
        log.warning("no MODELPRESS_API_KEYS_FILE: the API is open to anyone who can reach it")


def require_tenant() -> None:
    """``before_request`` of the /v1 blueprints: sets ``g.tenant`` or answers 401."""
    hashes = current_app.extensions["modelpress_keys"]
    if hashes is None:
        g.tenant = OPEN_TENANT
        return
    if "Authorization" not in request.headers and request.method in ("GET", "HEAD"):
        # The console's session may read (poll, download, report) but never change anything here:
        # its writes go through the console's forms, which carry CSRF tokens.
        tenant = session_tenant()
        if tenant is not None:
            g.tenant = tenant
            return
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    tenant = tenant_for(key.strip(), hashes) if scheme.lower() == "bearer" and key.strip() else None
    if tenant is None:
        raise ApiProblem(
            401,
            "Unauthorized",
            "send a valid API key as 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="modelpress"'},
        )
    g.tenant = tenant


def session_tenant() -> str | None:
    """The tenant of the console's signed session cookie; None when not signed in, signed out, or the key revoked."""
    hashes = current_app.extensions["modelpress_keys"]
    if hashes is None:
        return OPEN_TENANT
    digest, sid = session.get("key_sha256"), session.get("sid")
    if not isinstance(digest, str) or not isinstance(sid, str) or digest not in hashes:
        return None
    if _redis().exists(_SIGNED_OUT + sid):
        return None
    return hashes[digest]


def sign_in(key: str) -> str | None:
    """Keep the key's hash (never the key) in a fresh session; the tenant, or None for an unknown key."""
    hashes = current_app.extensions["modelpress_keys"]
    tenant = tenant_for(key.strip(), hashes) if hashes is not None and key.strip() else None
    if tenant is not None:
        session.clear()
        session["key_sha256"] = hash_key(key.strip())
        session["sid"] = secrets.token_urlsafe(18)
    return tenant


def sign_out() -> None:
    """Clear the session, and remember its id as signed out: a copy of the old cookie no longer signs in."""
    sid = session.get("sid")
    if isinstance(sid, str):
        _redis().set(_SIGNED_OUT + sid, 1, ex=int(current_app.permanent_session_lifetime.total_seconds()))
    session.clear()


_SIGNED_OUT = "modelpress:console:signed-out:"


def _redis():
    return current_app.extensions["modelpress_jobs"].redis


def may_see_operations() -> bool:
    """Whether the caller may read /metrics and the details of /readyz (other tenants' counts, workers).

    An open service shows them to anyone who can reach it; with keys, any valid API key or the
    separate ``MODELPRESS_METRICS_TOKEN`` (for a Prometheus scraper that holds no tenant's key).
    """
    hashes = current_app.extensions["modelpress_keys"]
    if hashes is None:
        return True
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return False
    token = current_app.extensions["modelpress"].metrics_token
    if token and hmac.compare_digest(key.encode(), token.encode()):
        return True
    return tenant_for(key, hashes) is not None


def require_operations_access() -> None:
    if not may_see_operations():
        raise ApiProblem(
            401,
            "Unauthorized",
            "send an API key or MODELPRESS_METRICS_TOKEN as 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="modelpress"'},
        )
