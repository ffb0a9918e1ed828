"""Liveness, readiness and metrics.

``/healthz`` is open. ``/readyz`` tells anyone whether the service is ready, but its details (Redis,
workers, each worker's job sandbox) and ``/metrics`` (every tenant's counts) need a key when keys are on.
"""

from __future__ import annotations

from typing import Any

from flask import Response, current_app
from flask.views import MethodView
from flask_smorest import Blueprint

from modelpress.metrics import render
from modelpress.worker_status import published
from service.auth import may_see_operations, require_operations_access
from service.problems import ApiProblem
from service.schemas import HealthSchema
from workers.celery_app import QUEUE

blp = Blueprint("health", __name__, description="Liveness and readiness")


@blp.route("/healthz")
class Health(MethodView):
    @blp.response(200, HealthSchema)
    def get(self) -> dict[str, Any]:
        """The API process is up."""
        return {"status": "ok"}


@blp.route("/readyz")
class Ready(MethodView):
    @blp.response(200, HealthSchema)
    @blp.alt_response(
        503, description="Redis, the object store or every worker is unreachable, or a worker cannot confine jobs"
    )
    def get(self) -> dict[str, Any]:
        """Redis (and the object store, if one is set) answers, at least one worker answers a ping, and no
        answering worker lacks its job sandbox."""
        detailed = may_see_operations()
        readiness = _readiness()
        if readiness["status"] != "ready":
            detail = readiness["detail"] if detailed else "not ready (send an API key for the reason)"
            raise ApiProblem(503, "Service Unavailable", detail, headers={"Retry-After": "5"})
        return readiness if detailed else {"status": "ready"}


@blp.route("/metrics")
class Metrics(MethodView):
    @blp.response(200, description="Prometheus text format", content_type="text/plain")
    @blp.alt_response(401, description="Keys are on and no API key or metrics token was sent")
    def get(self) -> Response:
        """Job counters, duration histogram, queue depth and bytes uploaded (shared by all API processes)."""
        require_operations_access()
        store = current_app.extensions["modelpress_jobs"]
        text = render(store.metrics(), queue_depth=int(store.redis.llen(QUEUE)), running=store.running_count())
        return Response(
            text, mimetype="text/plain", headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )


def _readiness() -> dict[str, Any]:
    client = current_app.extensions["modelpress_jobs"].redis
    try:
        client.ping()
    except Exception:
        return {"status": "unready", "detail": "Redis does not answer"}
    store_down = current_app.extensions["modelpress_objects"].unavailable()
    if store_down:
        return {"status": "unready", "detail": store_down}
    replies = current_app.extensions["celery"].control.ping(timeout=1.0) or []
    names = sorted(name for reply in replies for name in reply)
    if not names:
        return {"status": "unready", "detail": "no worker answered a ping"}
    statuses = published(client, names)
    unready = [
        f"{name}: {status.detail if status else 'has not tested its job sandbox yet'}"
        for name, status in statuses.items()
        if status is None or not status.ready
    ]
    if unready:
        return {
            "status": "unready",
            "detail": "a worker cannot confine jobs (sandbox-unavailable): " + "; ".join(unready),
        }
    return {
        "status": "ready",
        "redis": "ok",
        "workers": len(names),
        "sandbox": {name: status.state for name, status in statuses.items() if status},
    }
