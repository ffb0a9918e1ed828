"""Liveness and readiness."""
from __future__ import annotations

from typing import Any

from flask import Response, current_app
from flask.views import MethodView
from flask_smorest import Blueprint

from modelpress.metrics import render
from service.problems import ApiProblem
from workers.celery_app import QUEUE
from service.schemas import HealthSchema

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
    @blp.alt_response(503, description="Redis or every worker is unreachable")
    def get(self) -> dict[str, Any]:
        """Redis answers and at least one worker answers a ping."""
        try:
            current_app.extensions["modelpress_jobs"].redis.ping()
        except Exception:
            raise ApiProblem(503, "Service Unavailable", "Redis does not answer", headers={"Retry-After": "5"}) from None
        replies = current_app.extensions["celery"].control.ping(timeout=1.0) or []
        if not replies:
            raise ApiProblem(503, "Service Unavailable", "no worker answered a ping", headers={"Retry-After": "5"})
        return {"status": "ready", "redis": "ok", "workers": len(replies)}


@blp.route("/metrics")
class Metrics(MethodView):
    @blp.response(200, description="Prometheus text format", content_type="text/plain")
    def get(self) -> Response:
        """Job counters, duration histogram, queue depth and bytes uploaded (shared by all API processes)."""
        store = current_app.extensions["modelpress_jobs"]
        text = render(store.metrics(), queue_depth=int(store.redis.llen(QUEUE)), running=store.running_count())
        return Response(text, mimetype="text/plain", headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
