"""Wires Celery to Flask (``celery_init_app``, as in Flask's Celery example).

The API only sends tasks, by name; they run in the worker, which needs no Flask app, so there
is no app-context Task class here.
"""

from __future__ import annotations

from celery import Celery
from flask import Flask

from modelpress.config import Settings
from workers.celery_app import make_celery, send_job


def celery_init_app(app: Flask, settings: Settings) -> Celery:
    celery = make_celery(settings)
    app.extensions["celery"] = celery
    return celery


def enqueue_job(app: Flask, job_id: str, generation: int = 1) -> None:
    send_job(app.extensions["celery"], job_id, generation)
