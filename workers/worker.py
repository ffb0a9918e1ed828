"""Entry point of the worker process: ``celery -A workers.worker worker``."""
from celery.signals import after_setup_logger, worker_ready

from modelpress.config import Settings
from modelpress.jobs import JobStore, connect
from modelpress.logs import configure_logging
from workers.celery_app import make_celery
from workers.reaper import Reaper
from workers.webhook_delivery import Dispatcher

settings = Settings.from_env()
celery = make_celery(settings)


@worker_ready.connect
def _start_housekeeping(sender=None, **kwargs) -> None:
    Reaper(settings, celery).start()
    Dispatcher(settings, JobStore(connect(settings.redis_url))).start()


@after_setup_logger.connect
def _modelpress_logging(**kwargs) -> None:
    configure_logging(settings.log_level, settings.log_format)
