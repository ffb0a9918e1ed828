"""Wires Celery to Flask, as in Flask's Celery example; the API only sends tasks by name."""
from __future__ import annotations

from celery import Celery, Task
from flask import Flask

from modelpress.config import Settings
from workers.celery_app import RUN_JOB_TASK, make_celery


def celery_init_app(app: Flask, settings: Settings) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery = make_celery(settings)
    celery.Task = FlaskTask
    app.extensions["celery"] = celery
    return celery


def enqueue_job(app: Flask, job_id: str) -> None:
    app.extensions["celery"].send_task(RUN_JOB_TASK, args=[job_id])
