"""Bearer API keys and tenants for every /v1 route."""
from __future__ import annotations

import hmac
import logging

from flask import Flask, current_app, g, request

from modelpress.config import Settings
from modelpress.keys import load_keys, tenant_for
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
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    tenant = tenant_for(key.strip(), hashes) if scheme.lower() == "bearer" and key.strip() else None
    if tenant is None:
        raise ApiProblem(401, "Unauthorized", "send a valid API key as 'Authorization: Bearer <key>'",
                         headers={"WWW-Authenticate": 'Bearer realm="modelpress"'})
    g.tenant = tenant


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
        raise ApiProblem(401, "Unauthorized", "send an API key or MODELPRESS_METRICS_TOKEN as 'Authorization: Bearer <key>'",
                         headers={"WWW-Authenticate": 'Bearer realm="modelpress"'})
