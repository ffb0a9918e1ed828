"""Entry point of the worker process: ``celery -A workers.worker worker``."""

import logging

import redis
from celery.signals import after_setup_logger, worker_process_init, worker_process_shutdown, worker_ready

from modelpress.config import Settings
from modelpress.jobs import JobStore, connect
from modelpress.logs import configure_logging
from modelpress.worker_status import publish
from workers import sandbox, warm_sandbox
from workers.celery_app import make_celery
from workers.reaper import Reaper
from workers.webhook_delivery import Dispatcher

settings = Settings.from_env()
celery = make_celery(settings)


@worker_ready.connect
def _start_housekeeping(sender=None, **kwargs) -> None:
    Reaper(settings, celery).start()
    Dispatcher(settings, JobStore(connect(settings.redis_url))).start()


@worker_ready.connect
def _test_sandbox(sender=None, **kwargs) -> None:
    """Try the job sandbox once and publish the result for /readyz (a worker that cannot confine jobs is unready)."""
    status = sandbox.self_test(settings)
    level = logging.INFO if status.state == "confined" else logging.WARNING if status.state == "off" else logging.ERROR
    logging.getLogger("modelpress.sandbox").log(level, "job sandbox %s: %s", status.state, status.detail)
    publish(redis.Redis.from_url(settings.redis_url), sender.hostname, status)


@worker_process_init.connect
def _start_a_warm_sandbox(**kwargs) -> None:
    """Each pool process has its first job's sandbox started before that job arrives (workers/warm_sandbox.py)."""
    if warm_sandbox.enabled(settings):
        warm_sandbox.shared().prepare(settings)


@worker_process_shutdown.connect
def _stop_the_warm_sandbox(**kwargs) -> None:
    """A pool process that stops (the worker stopping, or ``worker_max_tasks_per_child``) stops its waiting
    process and removes its folder: Celery ends pool processes with ``os._exit``, so ``atexit`` never ran and
    each stop left an (empty) warm folder behind until the next start swept it."""
    if warm_sandbox.enabled(settings):
        warm_sandbox.shared().close()


@after_setup_logger.connect
def _modelpress_logging(**kwargs) -> None:
    configure_logging(settings.log_level, settings.log_format)
